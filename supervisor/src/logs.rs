//! Log relay.
//!
//! # Usage
//!
//! Build one [`LogSink`] per mesh from [`LogOptions`], hand clones to whoever spawns
//! processes, and call [`LogSink::attach`] with each replica's stdout and stderr. Mesh's own
//! lines go through [`LogSink::mesh_line`]. [`read_tail`] reads the last lines a replica
//! wrote, from the files, for error messages. `mesh logs` reads the files back with
//! [`replicas_in`], [`log_files`], [`tail_lines`] and [`parse_file_line`], and prints
//! them with [`format_line`], exactly as `mesh up` shows them.
//!
//! # Theory of operation
//!
//! Each attached replica gets one task that reads both of its pipes line by line. Every
//! line is formatted completely (prefix, text and newline) before it is written with a
//! single `write_all`, so lines from different replicas never interleave mid-line.
//!
//! Where the terminal writes happen is [`LogOptions::background`]'s choice. By default
//! they are synchronous, under the terminal lock (on a multi-thread runtime inside
//! `block_in_place`): a writer that blocks then blocks the relays, so this is for writers
//! that never block (tests, in-memory buffers). With `background`, which `mesh up` uses,
//! one thread of the sink's own (`mesh-log`) does them, and a terminal that stops reading
//! (a paused `mesh up | less`) never holds an application: the relays only append the
//! formatted line to a buffer of at most [`TERMINAL_BUFFER`] bytes (besides the batch
//! being written) and go back to the pipe at once. While the buffer is full, relayed lines are not shown but counted; once
//! the thread takes the buffer again (the terminal caught up), it writes one line of
//! mesh's own, `N lines not shown (terminal too slow); all are in <logs_dir>/`, in the
//! terminal's format (a JSON line from service `mesh` with `--log-format json`; without
//! `logs_dir`, the notice ends after the parenthesis). The files still get every line:
//! the relays write them themselves. This is what journald, supervisord and docker do:
//! whoever reads an application's pipe never waits on a viewer. Mesh's own lines (a few
//! per state change) are never skipped and never wait. [`LogSink::flush`] waits for the
//! thread to write what it was given.
//!
//! Each replica's lines are also appended to `logs_dir/<service>.<replica>.log`, one
//! `<ts> <stream> <line>` per line (RFC 3339 UTC with milliseconds, `stdout` or `stderr`),
//! so that `mesh logs` can replay them with timestamps and either format. A file that
//! would grow past `max_file_size` is rotated to `.log.1` (`.1` to `.2`, `.2` to `.3`,
//! the old `.3` dropped) first. Mesh's own lines are not written to files.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Default size at which a replica's log file is rotated.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 10 * 1024 * 1024;

/// Default cap on one line; longer lines are split into pieces of at most this many bytes.
pub const DEFAULT_MAX_LINE_LEN: usize = 64 * 1024;

/// How many rotated files (`.log.1` … `.log.3`) are kept besides the current one.
pub const ROTATED_FILES: u32 = 3;

/// The label of mesh's own lines.
const MESH_LABEL: &str = "mesh";

/// Prefix colours, chosen by a hash of the service name. Red is left out because it
/// reads as an error, and white/black because they vanish on one terminal theme or the
/// other.
const PALETTE: [&str; 8] = ["36", "33", "32", "35", "34", "96", "93", "95"];

/// Mesh's own label is bold instead of coloured, so it never looks like a service.
const MESH_STYLE: &str = "1";

/// How lines are printed on the terminal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `<service>.<replica> | <line>`.
    #[default]
    Text,
    /// One JSON object per line: `ts`, `service`, `replica`, `stream`, `line`.
    Json,
}

/// Which pipe a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// What a [`LogSink`] is built from.
pub struct LogOptions {
    pub format: LogFormat,
    /// Colour the text prefixes; the caller decides, usually from whether the writer is a
    /// terminal. Ignored for JSON.
    pub color: bool,
    /// Where the relayed lines go (stdout by default).
    pub writer: Box<dyn Write + Send>,
    /// `state_dir/logs`; `None` keeps no files. Created on first use.
    pub logs_dir: Option<PathBuf>,
    /// A file is rotated before a write would make it larger than this.
    pub max_file_size: u64,
    /// Longer lines are split into pieces of at most this many bytes.
    pub max_line_len: usize,
    /// Write to the terminal from a thread of the sink's own, skipping lines rather than
    /// waiting when the terminal falls behind (see the module docs). Without it, terminal
    /// writes are synchronous: only for a writer that never blocks.
    pub background: bool,
}

/// Bytes of formatted lines a background writer holds for a terminal that falls behind,
/// besides the batch it is writing: about 10 000 lines of 100 bytes, docker's
/// `max-buffer-size` for its non-blocking log mode. Relayed lines that do not fit are
/// skipped and counted until the writer takes the buffer again.
pub const TERMINAL_BUFFER: usize = 1024 * 1024;

/// A per-mesh log relay: cheap to clone, all clones write to the same place.
#[derive(Clone)]
pub struct LogSink {
    inner: Arc<Inner>,
}

/// One line of a replica's log file, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRecord {
    /// RFC 3339 UTC timestamp with milliseconds, as written.
    pub ts: String,
    pub stream: Stream,
    pub line: String,
}

/// The path of a replica's current log file: `logs_dir/<service>.<replica>.log`.
pub fn log_file(logs_dir: &Path, service: &str, replica: u32) -> PathBuf {
    logs_dir.join(format!("{service}.{replica}.log"))
}

/// Every file that may hold a replica's lines, oldest first: `<service>.<replica>.log.3`,
/// `.log.2`, `.log.1`, then the current `.log` (see [`LogOptions::max_file_size`] for the
/// rotation). Whether each exists is for the caller to find out: a running mesh may rotate
/// them at any moment.
pub fn log_files(logs_dir: &Path, service: &str, replica: u32) -> Vec<PathBuf> {
    let current = log_file(logs_dir, service, replica);
    let mut files: Vec<PathBuf> = (1..=ROTATED_FILES)
        .rev()
        .map(|i| rotated(&current, i))
        .collect();
    files.push(current);
    files
}

/// The replicas of `service` that have a log file (current or rotated) in `logs_dir`,
/// in order. Replicas of an earlier configuration (scaled down since) are included: their
/// files are still there. A missing directory has none.
pub fn replicas_in(logs_dir: &Path, service: &str) -> io::Result<Vec<u32>> {
    let entries = match fs::read_dir(logs_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut replicas = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        if let Some(replica) = name.to_str().and_then(|n| replica_of(n, service)) {
            replicas.push(replica);
        }
    }
    replicas.sort_unstable();
    replicas.dedup();
    Ok(replicas)
}

/// One replica's line as `mesh up` shows it on the terminal, newline included:
/// `<service>.<replica> | <line>`, the label in the service's colour when `color`, or the
/// JSON object (`ts`, `service`, `replica`, `stream`, `line`). `None` if it cannot be
/// formatted (it can't).
pub fn format_line(
    format: LogFormat,
    color: bool,
    service: &str,
    replica: u32,
    stream: Stream,
    ts: &str,
    line: &str,
) -> Option<String> {
    let layout = Layout { format, color };
    layout.line(
        &format!("{service}.{replica}"),
        Some((service, replica)),
        palette_colour(service),
        stream,
        ts,
        line,
    )
}

/// The last `n` complete lines of `file` before byte `end`, oldest first, and the offset
/// just past the last of them. A line still being written (no newline yet before `end`)
/// is left out, and the offset is where it starts, so that a reader following the file
/// picks it up whole from there. Reads backwards in blocks from `end`.
pub fn tail_lines(file: &mut File, end: u64, n: usize) -> io::Result<(Vec<String>, u64)> {
    let (buf, start) = tail_block(file, end, n)?;
    // Up to and including the last newline: the complete lines.
    let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let end_complete = start + complete as u64;
    let mut pieces: Vec<&[u8]> = buf[..complete].split(|&b| b == b'\n').collect();
    // The split leaves an empty piece after the last newline.
    pieces.pop();
    if start > 0 && !pieces.is_empty() {
        // The first piece starts mid-line.
        pieces.remove(0);
    }
    let skip = pieces.len().saturating_sub(n);
    let lines = pieces[skip..]
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    Ok((lines, end_complete))
}

/// The last `n` lines a replica wrote, oldest first, across its rotated files.
///
/// Returns the lines' text without the stored timestamp and stream (a stored line that
/// does not parse is returned whole). No log files at all is an empty list, not an error.
pub fn read_tail(
    logs_dir: &Path,
    service: &str,
    replica: u32,
    n: usize,
) -> io::Result<Vec<String>> {
    let raw = read_tail_raw(logs_dir, service, replica, n)?;
    Ok(raw
        .into_iter()
        .map(|l| match parse_file_line(&l) {
            Some(record) => record.line,
            None => l,
        })
        .collect())
}

/// Like [`read_tail`], but the stored lines verbatim (`<ts> <stream> <line>`); see
/// [`parse_file_line`].
pub fn read_tail_raw(
    logs_dir: &Path,
    service: &str,
    replica: u32,
    n: usize,
) -> io::Result<Vec<String>> {
    // Newest first: the current file, then .1, .2, .3.
    let files = log_files(logs_dir, service, replica).into_iter().rev();
    let mut chunks: Vec<Vec<String>> = Vec::new();
    let mut found = 0;
    for path in files {
        if found >= n {
            break;
        }
        match tail_of_file(&path, n - found) {
            Ok(lines) => {
                found += lines.len();
                chunks.push(lines);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(chunks.into_iter().rev().flatten().collect())
}

/// Parse one stored line, `<ts> <stream> <line>`.
pub fn parse_file_line(raw: &str) -> Option<FileRecord> {
    let (ts, rest) = raw.split_once(' ')?;
    let (stream, line) = rest.split_once(' ').unwrap_or((rest, ""));
    let stream = match stream {
        "stdout" => Stream::Stdout,
        "stderr" => Stream::Stderr,
        _ => return None,
    };
    humantime::parse_rfc3339(ts).ok()?;
    Some(FileRecord {
        ts: ts.to_owned(),
        stream,
        line: line.to_owned(),
    })
}

// === impl Stream ===

impl Stream {
    /// `stdout` or `stderr`, as in JSON lines and log files.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl LogOptions ===

impl Default for LogOptions {
    /// Text without colour to stdout, no files, default size limits.
    fn default() -> Self {
        LogOptions {
            format: LogFormat::Text,
            color: false,
            writer: Box::new(io::stdout()),
            logs_dir: None,
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            max_line_len: DEFAULT_MAX_LINE_LEN,
            background: false,
        }
    }
}

impl fmt::Debug for LogOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogOptions")
            .field("format", &self.format)
            .field("color", &self.color)
            .field("logs_dir", &self.logs_dir)
            .field("max_file_size", &self.max_file_size)
            .field("max_line_len", &self.max_line_len)
            .field("background", &self.background)
            .finish_non_exhaustive()
    }
}

// === impl LogSink ===

impl LogSink {
    /// A sink writing as `options` say.
    pub fn new(options: LogOptions) -> Self {
        let writer_failed = Arc::new(AtomicBool::new(false));
        let layout = Layout {
            format: options.format,
            color: options.color,
        };
        let terminal = if options.background {
            Terminal::background(
                options.writer,
                Arc::clone(&writer_failed),
                layout,
                options.logs_dir.clone(),
            )
        } else {
            Terminal::Direct(Mutex::new(options.writer))
        };
        LogSink {
            inner: Arc::new(Inner {
                layout,
                terminal,
                writer_failed,
                logs_dir: options.logs_dir,
                max_file_size: options.max_file_size,
                // A zero cap could never make progress on a long line.
                max_line_len: options.max_line_len.max(4),
                files: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Relay one replica's stdout and stderr until both reach end of file.
    ///
    /// Lines are split at `\n` (a trailing `\r` is dropped), invalid UTF-8 is replaced,
    /// lines longer than `max_line_len` are split, and a last line without a newline is
    /// still relayed. The returned task ends when both streams end or fail; abort it to
    /// stop relaying early. It runs in the caller's current tracing span; call this within
    /// a Tokio runtime.
    pub fn attach<O, E>(&self, service: &str, replica: u32, stdout: O, stderr: E) -> JoinHandle<()>
    where
        O: AsyncRead + Send + Unpin + 'static,
        E: AsyncRead + Send + Unpin + 'static,
    {
        let source = Arc::new(self.source(service, replica));
        let file = source.file.clone();
        let out = pump(self.clone(), source.clone(), Stream::Stdout, stdout);
        let err = pump(self.clone(), source, Stream::Stderr, stderr);
        let task = async move {
            tokio::join!(out, err);
            // Release the descriptor of a replica that may never run again (scaled down);
            // a later line for it simply reopens the file.
            if let Some(file) = &file {
                file.lock().file = None;
            }
        };
        tokio::spawn(task.in_current_span())
    }

    /// Relay one line as if `replica` of `service` had written it, for example mesh's
    /// note that the program could not be started, so that it also lands in the file.
    pub fn replica_line(&self, service: &str, replica: u32, stream: Stream, line: &str) {
        let source = self.source(service, replica);
        for piece in line.split('\n') {
            self.emit(&source, stream, piece, false);
        }
    }

    /// Wait until every line handed to the terminal so far is written and flushed, for
    /// at most `within` (a stalled terminal may never take them). `true` when done.
    /// Without a background writer, writes are already done; this flushes the writer.
    /// A pending notice of skipped lines counts as handed over.
    pub fn flush(&self, within: Duration) -> bool {
        match &self.inner.terminal {
            Terminal::Direct(writer) => writer.lock().flush().is_ok(),
            Terminal::Background(backlog) => backlog.wait_written(within),
        }
    }

    /// Print one of mesh's own lines (label `mesh`; JSON `"service": "mesh"`,
    /// `"replica": null`, `"stream": "stderr"`). Not written to any file.
    pub fn mesh_line(&self, line: &str) {
        for piece in line.split('\n') {
            let ts = timestamp(self.inner.layout.format);
            let out =
                self.inner
                    .layout
                    .line(MESH_LABEL, None, MESH_STYLE, Stream::Stderr, &ts, piece);
            self.inner.write_terminal(out, false);
        }
    }

    fn source(&self, service: &str, replica: u32) -> Source {
        let label = format!("{service}.{replica}");
        let file = self.inner.logs_dir.as_ref().map(|dir| {
            let path = log_file(dir, service, replica);
            // One slot per file, shared by every attachment of that replica (a restarted
            // replica's new process reuses it), so that rotation is never raced.
            self.inner
                .files
                .lock()
                .entry(path.clone())
                .or_insert_with(|| Arc::new(Mutex::new(FileSlot::new(path))))
                .clone()
        });
        Source {
            service: service.to_owned(),
            replica,
            label,
            style: palette_colour(service),
            file,
        }
    }

    /// Relay one line of `source`; `relayed`: it comes from the application's pipe, and
    /// the terminal may skip it when it falls behind (mesh's own notes are always shown).
    fn emit(&self, source: &Source, stream: Stream, line: &str, relayed: bool) {
        let inner = &*self.inner;
        // Files always carry a timestamp, the terminal only in JSON.
        let ts = if source.file.is_some() || inner.layout.format == LogFormat::Json {
            humantime::format_rfc3339_millis(SystemTime::now()).to_string()
        } else {
            String::new()
        };
        let out = inner.layout.line(
            &source.label,
            Some((&source.service, source.replica)),
            source.style,
            stream,
            &ts,
            line,
        );
        inner.write_terminal(out, relayed);
        if let Some(file) = &source.file {
            let record = format!("{ts} {stream} {line}\n");
            file.lock().append(record.as_bytes(), inner.max_file_size);
        }
    }
}

impl fmt::Debug for LogSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogSink")
            .field("format", &self.inner.layout.format)
            .field("color", &self.inner.layout.color)
            .field("logs_dir", &self.inner.logs_dir)
            .finish_non_exhaustive()
    }
}

struct Inner {
    layout: Layout,
    terminal: Terminal,
    /// Set after the first terminal write error, so that it is reported once.
    writer_failed: Arc<AtomicBool>,
    logs_dir: Option<PathBuf>,
    max_file_size: u64,
    max_line_len: usize,
    /// One slot per replica's file, shared by all of its attachments.
    files: Mutex<HashMap<PathBuf, Arc<Mutex<FileSlot>>>>,
}

/// How terminal lines look.
#[derive(Clone, Copy)]
struct Layout {
    format: LogFormat,
    color: bool,
}

/// Where terminal lines are written.
enum Terminal {
    /// By the caller, under the lock.
    Direct(Mutex<Box<dyn Write + Send>>),
    /// By the `mesh-log` thread, from a bounded buffer.
    Background(Arc<Backlog>),
}

/// What the sink and its `mesh-log` thread share.
struct Backlog {
    queue: Mutex<Queue>,
    /// Wakes the thread: there is something to write, or the sink is gone.
    work: Condvar,
    /// Wakes [`LogSink::flush`]: a batch was written.
    written: Condvar,
    /// How the notice of skipped lines looks, and the directory it names.
    layout: Layout,
    logs_dir: Option<PathBuf>,
}

struct Queue {
    /// Formatted lines for the thread, back to back; relayed lines are added only while
    /// this stays within [`TERMINAL_BUFFER`] bytes.
    pending: Vec<u8>,
    /// Relayed lines not shown since the thread last took `pending`. While it is not
    /// zero every relayed line is skipped, so the notice that reports them stands where
    /// they would have been.
    skipped: u64,
    /// Lines handed over so far, skipped ones included (their notice is still to be
    /// written); `flush` waits for `written` to reach it.
    queued: u64,
    /// `queued` as of the last batch the thread finished writing.
    written: u64,
    /// The sink is gone: the thread ends once everything is written.
    closed: bool,
}

impl Terminal {
    /// Start the writer thread (`mesh-log`). It ends when the sink is dropped.
    fn background(
        mut writer: Box<dyn Write + Send>,
        failed: Arc<AtomicBool>,
        layout: Layout,
        logs_dir: Option<PathBuf>,
    ) -> Terminal {
        let backlog = Arc::new(Backlog {
            queue: Mutex::new(Queue {
                pending: Vec::new(),
                skipped: 0,
                queued: 0,
                written: 0,
                closed: false,
            }),
            work: Condvar::new(),
            written: Condvar::new(),
            layout,
            logs_dir,
        });
        let shared = Arc::clone(&backlog);
        let spawned = std::thread::Builder::new()
            .name("mesh-log".into())
            .spawn(move || shared.run(&mut *writer, &failed));
        if let Err(e) = spawned {
            // No thread (the writer went with the failed spawn): write to stdout directly
            // rather than lose the lines.
            tracing::warn!(error = %e, "cannot start the log writer thread; writing directly");
            return Terminal::Direct(Mutex::new(Box::new(io::stdout())));
        }
        Terminal::Background(backlog)
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Terminal::Background(backlog) = self {
            backlog.queue.lock().closed = true;
            backlog.work.notify_one();
        }
    }
}

impl Backlog {
    /// Hand a formatted line to the thread. A `relayed` line is skipped (and counted)
    /// when the buffer is full; any other line is always taken, after the notice of the
    /// lines skipped before it. Never waits for the terminal.
    fn push(&self, text: &str, relayed: bool) {
        let mut queue = self.queue.lock();
        if relayed {
            let full =
                !queue.pending.is_empty() && queue.pending.len() + text.len() > TERMINAL_BUFFER;
            if queue.skipped > 0 || full {
                queue.skipped += 1;
                queue.queued += 1;
                // No wake-up needed: `pending` is not empty, the thread has work.
                return;
            }
        } else if queue.skipped > 0 {
            let notice = self.notice(std::mem::take(&mut queue.skipped));
            queue.pending.extend_from_slice(notice.as_bytes());
        }
        queue.pending.extend_from_slice(text.as_bytes());
        queue.queued += 1;
        drop(queue);
        self.work.notify_one();
    }

    /// The thread: write whatever is pending in one go, then the notice of what was
    /// skipped meanwhile, until the sink is gone.
    fn run(&self, writer: &mut dyn Write, failed: &AtomicBool) {
        let mut batch = Vec::new();
        loop {
            let upto = {
                let mut queue = self.queue.lock();
                while queue.pending.is_empty() && queue.skipped == 0 && !queue.closed {
                    self.work.wait(&mut queue);
                }
                if queue.pending.is_empty() && queue.skipped == 0 {
                    return;
                }
                // The emptied buffer of the last batch takes the next lines.
                std::mem::swap(&mut batch, &mut queue.pending);
                if queue.skipped > 0 {
                    let notice = self.notice(std::mem::take(&mut queue.skipped));
                    batch.extend_from_slice(notice.as_bytes());
                }
                queue.queued
            };
            let result = writer.write_all(&batch).and_then(|()| writer.flush());
            batch.clear();
            // Do not keep a burst's megabyte for good.
            batch.shrink_to(64 * 1024);
            if let Err(e) = result {
                if !failed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "cannot write logs to the terminal");
                }
            }
            self.queue.lock().written = upto;
            self.written.notify_all();
        }
    }

    /// Wait until everything handed over so far is written, for at most `within`.
    fn wait_written(&self, within: Duration) -> bool {
        let mut queue = self.queue.lock();
        let target = queue.queued;
        self.written
            .wait_while_for(&mut queue, |q| q.written < target, within);
        queue.written >= target
    }

    /// Mesh's line about `n` relayed lines it did not show.
    fn notice(&self, n: u64) -> String {
        let mut text = format!("{n} lines not shown (terminal too slow)");
        if let Some(dir) = &self.logs_dir {
            let dir = dir.display().to_string();
            let slash = if dir.ends_with('/') { "" } else { "/" };
            text.push_str(&format!("; all are in {dir}{slash}"));
        }
        let ts = timestamp(self.layout.format);
        // A line that cannot be formatted (it can't) leaves only the count behind.
        self.layout
            .line(MESH_LABEL, None, MESH_STYLE, Stream::Stderr, &ts, &text)
            .unwrap_or_else(|| format!("{text}\n"))
    }
}

/// One replica as a source of lines.
struct Source {
    service: String,
    replica: u32,
    /// `<service>.<replica>`.
    label: String,
    /// ANSI SGR parameters of the label when colour is on.
    style: &'static str,
    file: Option<Arc<Mutex<FileSlot>>>,
}

#[derive(Serialize)]
struct JsonLine<'a> {
    ts: &'a str,
    service: &'a str,
    replica: Option<u32>,
    stream: &'a str,
    line: &'a str,
}

impl Layout {
    /// A terminal line: `<label> | <line>` or the JSON object, with its newline. `None`
    /// if it cannot be formatted.
    fn line(
        &self,
        label: &str,
        origin: Option<(&str, u32)>,
        style: &str,
        stream: Stream,
        ts: &str,
        line: &str,
    ) -> Option<String> {
        let mut out = match self.format {
            LogFormat::Text => {
                // Exactly `<label> | <line>` (SPEC §4): no padding, so that tools and
                // tests can match the prefix.
                if self.color {
                    format!("\x1b[{style}m{label} |\x1b[0m {line}")
                } else {
                    format!("{label} | {line}")
                }
            }
            LogFormat::Json => {
                let (service, replica) = match origin {
                    Some((service, replica)) => (service, Some(replica)),
                    None => (MESH_LABEL, None),
                };
                let json = JsonLine {
                    ts,
                    service,
                    replica,
                    stream: stream.as_str(),
                    line,
                };
                match serde_json::to_string(&json) {
                    Ok(s) => s,
                    // Serializing plain strings and numbers cannot fail; if it ever did,
                    // losing one line beats stopping the relay.
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot format log line as json");
                        return None;
                    }
                }
            }
        };
        out.push('\n');
        Some(out)
    }
}

impl Inner {
    /// Write a line from [`Layout::line`]; `relayed`: it comes from an application's
    /// pipe, and a background writer that has fallen behind skips it.
    fn write_terminal(&self, out: Option<String>, relayed: bool) {
        let Some(out) = out else {
            return;
        };
        let writer = match &self.terminal {
            Terminal::Direct(writer) => writer,
            Terminal::Background(backlog) => {
                backlog.push(&out, relayed);
                return;
            }
        };
        let write = || {
            let mut writer = writer.lock();
            writer
                .write_all(out.as_bytes())
                .and_then(|()| writer.flush())
        };
        // A stalled terminal (`mesh up | less`, a paused pipe) blocks this write. On a
        // multi-thread runtime, tell tokio first: it hands this worker's other tasks (the
        // sidecars among them) to another thread instead of freezing them behind the log.
        let result = match tokio::runtime::Handle::try_current() {
            Ok(rt) if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(write)
            }
            _ => write(),
        };
        match result {
            Ok(()) => {}
            Err(e) => {
                if !self.writer_failed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "cannot write logs to the terminal");
                }
            }
        }
    }
}

/// A replica's log file, opened lazily and reopened after an error.
struct FileSlot {
    path: PathBuf,
    file: Option<File>,
    /// Bytes in the current file.
    size: u64,
    /// Set after a write error has been reported, until a write succeeds again.
    failing: bool,
}

impl FileSlot {
    fn new(path: PathBuf) -> Self {
        FileSlot {
            path,
            file: None,
            size: 0,
            failing: false,
        }
    }

    /// Append one record. Errors are reported once per failing spell and otherwise
    /// swallowed: a full disk must not stop the terminal relay.
    fn append(&mut self, record: &[u8], max_size: u64) {
        match self.try_append(record, max_size) {
            Ok(()) => self.failing = false,
            Err(e) => {
                // Drop the handle so the next line reopens the file, which recovers from
                // a deleted directory or a file rotated away by hand.
                self.file = None;
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot write log file");
                }
            }
        }
    }

    fn try_append(&mut self, record: &[u8], max_size: u64) -> io::Result<()> {
        let len = record.len() as u64;
        if self.file.is_none() {
            self.open()?;
        }
        // A record larger than the limit on its own still goes into a fresh file.
        if self.size > 0 && self.size + len > max_size {
            self.file = None;
            rotate(&self.path)?;
            self.open()?;
        }
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("log file not open"));
        };
        file.write_all(record)?;
        self.size += len;
        Ok(())
    }

    fn open(&mut self) -> io::Result<()> {
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = file.metadata()?.len();
        self.file = Some(file);
        Ok(())
    }
}

/// Shift `X.log.2` → `.3`, `.1` → `.2`, `X.log` → `.1`; the oldest is overwritten.
fn rotate(current: &Path) -> io::Result<()> {
    for i in (1..ROTATED_FILES).rev() {
        rename_if_exists(&rotated(current, i), &rotated(current, i + 1))?;
    }
    rename_if_exists(current, &rotated(current, 1))
}

fn rename_if_exists(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// `X.log.i`: the `i`-th rotated file of `X.log`, `.1` the newest.
fn rotated(current: &Path, i: u32) -> PathBuf {
    let mut name = current.as_os_str().to_owned();
    name.push(format!(".{i}"));
    PathBuf::from(name)
}

/// The last `n` lines of a file, oldest first (a last line without a newline counts),
/// read backwards in blocks so that a 10 MiB file is not read whole for 20 lines.
fn tail_of_file(path: &Path, n: usize) -> io::Result<Vec<String>> {
    let mut file = File::open(path)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let end = file.metadata()?.len();
    let (buf, start) = tail_block(&mut file, end, n)?;
    let mut pieces: Vec<&[u8]> = buf.split(|&b| b == b'\n').collect();
    if pieces.last().is_some_and(|p| p.is_empty()) {
        pieces.pop();
    }
    if start > 0 && !pieces.is_empty() {
        // The first piece starts mid-line.
        pieces.remove(0);
    }
    let skip = pieces.len().saturating_sub(n);
    Ok(pieces[skip..]
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect())
}

/// The bytes of `file` from `start` to `end`, read backwards in blocks of 64 KiB until
/// they hold more than `newlines` newlines or reach the start of the file; returns them
/// with `start`. More than `n` newlines guarantee `n` complete lines after the first
/// (maybe partial) one, with or without a partial line at the end.
fn tail_block(file: &mut File, end: u64, newlines: usize) -> io::Result<(Vec<u8>, u64)> {
    const BLOCK: u64 = 64 * 1024;
    let mut pos = end;
    let mut buf: Vec<u8> = Vec::new();
    while pos > 0 && buf.iter().filter(|&&b| b == b'\n').count() <= newlines {
        let step = pos.min(BLOCK);
        pos -= step;
        file.seek(SeekFrom::Start(pos))?;
        let mut block = vec![0; step as usize];
        file.read_exact(&mut block)?;
        block.extend_from_slice(&buf);
        buf = block;
    }
    Ok((buf, pos))
}

fn timestamp(format: LogFormat) -> String {
    match format {
        LogFormat::Json => humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        LogFormat::Text => String::new(),
    }
}

/// A stable colour per service: FNV-1a of the name, because std's hasher may change
/// between Rust releases and colours should not.
fn palette_colour(service: &str) -> &'static str {
    let mut hash: u32 = 0x811c_9dc5;
    for b in service.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    PALETTE[hash as usize % PALETTE.len()]
}

/// The replica of `service` whose log file `name` is (`<service>.<replica>.log`, or one
/// of its rotated files `.log.1` … `.log.3`), if it is one. Service names hold no dots,
/// so `<service>.` followed by digits is unambiguous.
fn replica_of(name: &str, service: &str) -> Option<u32> {
    let rest = name.strip_prefix(service)?.strip_prefix('.')?;
    let (replica, suffix) = rest.split_once('.')?;
    if replica.is_empty() || !replica.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let rotation = suffix.strip_prefix("log")?;
    let known = rotation.is_empty() || (1..=ROTATED_FILES).any(|i| rotation == format!(".{i}"));
    if !known {
        return None;
    }
    replica.parse().ok()
}

/// Read `reader` line by line until end of file or an error, relaying each line.
async fn pump<R>(sink: LogSink, source: Arc<Source>, stream: Stream, reader: R)
where
    R: AsyncRead + Unpin,
{
    let max = sink.inner.max_line_len;
    let mut reader = BufReader::new(reader);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let buf = match reader.fill_buf().await {
            Ok(buf) => buf,
            Err(e) => {
                tracing::warn!(service = %source.service, replica = source.replica, %stream, error = %e, "cannot read output");
                break;
            }
        };
        if buf.is_empty() {
            break;
        }
        let room = max - line.len();
        // Looking one byte past the room finds the newline of a line of exactly `max`
        // bytes, which must not be followed by a spurious empty piece.
        let window = &buf[..buf.len().min(room + 1)];
        if let Some(i) = window.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&window[..i]);
            reader.consume(i + 1);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            sink.emit(&source, stream, &String::from_utf8_lossy(&line), true);
            line.clear();
            // Nothing here waits any more (the pipe's buffer refills only every 8 KiB):
            // count each line against the task's budget so that a flooding app yields the
            // runtime's one thread to the sidecars every so many lines.
            tokio::task::consume_budget().await;
        } else {
            let take = buf.len().min(room);
            line.extend_from_slice(&buf[..take]);
            reader.consume(take);
            if line.len() >= max {
                let cut = utf8_cut(&line);
                sink.emit(
                    &source,
                    stream,
                    &String::from_utf8_lossy(&line[..cut]),
                    true,
                );
                line.drain(..cut);
                tokio::task::consume_budget().await;
            }
        }
    }
    if !line.is_empty() {
        sink.emit(&source, stream, &String::from_utf8_lossy(&line), true);
    }
}

/// Where to split a too-long line: before a UTF-8 sequence cut off at its end, so that a
/// character is not mangled into two replacement characters.
fn utf8_cut(bytes: &[u8]) -> usize {
    match std::str::from_utf8(bytes) {
        Err(e) if e.error_len().is_none() && e.valid_up_to() > 0 => e.valid_up_to(),
        _ => bytes.len(),
    }
}

#[cfg(test)]
mod tests;
