#![allow(clippy::unwrap_used, reason = "a failing test panics")]

use std::io::{self, Write};
use std::sync::Arc;

use parking_lot::Mutex;

use super::*;

/// An in-memory terminal.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Buffer {
    fn lines(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().clone())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

fn sink(format: LogFormat, color: bool, logs_dir: Option<PathBuf>) -> (LogSink, Buffer) {
    let buffer = Buffer::default();
    let sink = LogSink::new(LogOptions {
        format,
        color,
        writer: Box::new(buffer.clone()),
        logs_dir,
        ..LogOptions::default()
    });
    (sink, buffer)
}

#[tokio::test]
async fn text_lines_are_prefixed() {
    let (sink, out) = sink(LogFormat::Text, false, None);
    sink.attach("web", 0, &b"hello\nworld\n"[..], &b""[..])
        .await
        .unwrap();
    sink.mesh_line("started");
    assert_eq!(
        out.lines(),
        ["web.0 | hello", "web.0 | world", "mesh | started"]
    );
}

#[tokio::test]
async fn colour_only_when_asked() {
    let (plain, plain_out) = sink(LogFormat::Text, false, None);
    plain.attach("api", 1, &b"x\n"[..], &b""[..]).await.unwrap();
    assert!(!plain_out.lines()[0].contains('\x1b'));

    let (coloured, out) = sink(LogFormat::Text, true, None);
    coloured
        .attach("api", 1, &b"x\n"[..], &b""[..])
        .await
        .unwrap();
    coloured.mesh_line("m");
    let colour = palette_colour("api");
    assert_eq!(
        out.lines(),
        [
            format!("\x1b[{colour}mapi.1 |\x1b[0m x"),
            "\x1b[1mmesh |\x1b[0m m".to_owned(),
        ]
    );
    // The same name always gets the same colour; different names spread over the palette.
    assert_eq!(palette_colour("api"), colour);
    let names = [
        "web", "api", "db", "cache", "worker", "auth", "queue", "search",
    ];
    let distinct: std::collections::HashSet<_> = names.iter().map(|n| palette_colour(n)).collect();
    assert!(distinct.len() > 2);
}

#[tokio::test]
async fn json_lines_carry_every_field() {
    let (sink, out) = sink(LogFormat::Json, true, None);
    sink.attach("web", 2, &b"out \"quoted\"\n"[..], &b"err\n"[..])
        .await
        .unwrap();
    sink.mesh_line("hello");
    let mut values: Vec<serde_json::Value> = out
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(values.len(), 3);
    for v in &values {
        let ts = v["ts"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts}");
        assert!(
            ts.ends_with('Z') && ts.len() == "2024-01-01T00:00:00.000Z".len(),
            "{ts}"
        );
    }
    let mesh = values.pop().unwrap();
    assert_eq!(mesh["service"], "mesh");
    assert!(mesh["replica"].is_null());
    assert_eq!(mesh["line"], "hello");
    values.sort_by_key(|v| v["stream"].as_str().unwrap().to_owned());
    assert_eq!(values[0]["stream"], "stderr");
    assert_eq!(values[0]["line"], "err");
    assert_eq!(values[1]["service"], "web");
    assert_eq!(values[1]["replica"], 2);
    assert_eq!(values[1]["stream"], "stdout");
    assert_eq!(values[1]["line"], "out \"quoted\"");
}

#[tokio::test]
async fn partial_last_line_crlf_and_invalid_utf8() {
    let (sink, out) = sink(LogFormat::Text, false, None);
    sink.attach("app", 0, &b"one\r\ntwo\xff\nlast"[..], &b""[..])
        .await
        .unwrap();
    assert_eq!(
        out.lines(),
        ["app.0 | one", "app.0 | two\u{fffd}", "app.0 | last"]
    );
}

#[tokio::test]
async fn long_lines_are_split() {
    let buffer = Buffer::default();
    let sink = LogSink::new(LogOptions {
        writer: Box::new(buffer.clone()),
        max_line_len: 8,
        ..LogOptions::default()
    });
    // Exactly 8 bytes is one line; 20 bytes is 8 + 8 + 4; a multi-byte character is
    // never cut in half.
    let input = "12345678\nabcdefghijklmnopqrst\n1234567é9\n"
        .as_bytes()
        .to_vec();
    sink.attach("app", 0, io::Cursor::new(input), &b""[..])
        .await
        .unwrap();
    assert_eq!(
        buffer.lines(),
        [
            "app.0 | 12345678",
            "app.0 | abcdefgh",
            "app.0 | ijklmnop",
            "app.0 | qrst",
            "app.0 | 1234567",
            "app.0 | é9",
        ]
    );
}

#[tokio::test]
async fn lines_never_interleave() {
    let (sink, out) = sink(LogFormat::Text, false, None);
    let line = "x".repeat(1000);
    let text = format!("{line}\n").repeat(200).into_bytes();
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            sink.attach(
                "svc",
                i,
                io::Cursor::new(text.clone()),
                io::Cursor::new(text.clone()),
            )
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let lines = out.lines();
    assert_eq!(lines.len(), 4 * 2 * 200);
    for l in lines {
        let (_, rest) = l.split_once(" | ").unwrap();
        assert_eq!(rest, line);
    }
}

#[tokio::test]
async fn files_get_timestamp_stream_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let (sink, _) = sink(LogFormat::Text, false, Some(logs.clone()));
    sink.attach("web", 0, &b"out\n"[..], &b""[..])
        .await
        .unwrap();
    sink.attach("web", 0, &b""[..], &b"err\n"[..])
        .await
        .unwrap();
    sink.mesh_line("not in any file");
    let text = fs::read_to_string(logs.join("web.0.log")).unwrap();
    let records: Vec<_> = text.lines().map(|l| parse_file_line(l).unwrap()).collect();
    assert_eq!(records.len(), 2);
    assert_eq!(
        (records[0].stream, records[0].line.as_str()),
        (Stream::Stdout, "out")
    );
    assert_eq!(
        (records[1].stream, records[1].line.as_str()),
        (Stream::Stderr, "err")
    );
    assert_eq!(fs::read_dir(&logs).unwrap().count(), 1);
}

#[tokio::test]
async fn files_rotate_and_keep_three() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = Buffer::default();
    let sink = LogSink::new(LogOptions {
        writer: Box::new(buffer.clone()),
        logs_dir: Some(dir.path().to_owned()),
        max_file_size: 200,
        ..LogOptions::default()
    });
    // Each record is 24 (ts) + 1 + 6 (stream) + 1 + 8 (line) + 1 = 41 bytes: four per file.
    let input: String = (0..30).map(|i| format!("line{i:04}\n")).collect();
    sink.attach("db", 0, io::Cursor::new(input.into_bytes()), &b""[..])
        .await
        .unwrap();

    let mut names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["db.0.log", "db.0.log.1", "db.0.log.2", "db.0.log.3"]
    );
    for name in &names {
        let len = fs::metadata(dir.path().join(name)).unwrap().len();
        assert!(len <= 200, "{name} is {len} bytes");
    }
    // 30 lines in files of 4: the current file holds 28..29, .1 24..27 and .3 16..19.
    let lines = |name: &str| -> Vec<String> {
        fs::read_to_string(dir.path().join(name))
            .unwrap()
            .lines()
            .map(|l| parse_file_line(l).unwrap().line)
            .collect()
    };
    assert_eq!(lines("db.0.log"), ["line0028", "line0029"]);
    assert_eq!(lines("db.0.log.1")[0], "line0024");
    assert_eq!(lines("db.0.log.3")[0], "line0016");
    // The terminal got everything.
    assert_eq!(buffer.lines().len(), 30);

    // read_tail crosses the rotated files, oldest first.
    let tail = read_tail(dir.path(), "db", 0, 7).unwrap();
    let want: Vec<_> = (23..30).map(|i| format!("line{i:04}")).collect();
    assert_eq!(tail, want);
    let all = read_tail(dir.path(), "db", 0, 100).unwrap();
    let want: Vec<_> = (16..30).map(|i| format!("line{i:04}")).collect();
    assert_eq!(all, want);
    assert!(read_tail(dir.path(), "db", 0, 0).unwrap().is_empty());
}

#[test]
fn read_tail_of_nothing_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    assert!(read_tail(dir.path(), "none", 0, 20).unwrap().is_empty());
}

#[test]
fn tail_reads_backwards_across_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.log");
    // Lines of 1000 bytes, more than one 64 KiB block, and no final newline.
    let mut text: String = (0..200).map(|i| format!("{i:0999}\n")).collect();
    text.push_str("partial");
    fs::write(&path, text).unwrap();
    let tail = tail_of_file(&path, 100).unwrap();
    assert_eq!(tail.len(), 100);
    assert_eq!(tail[0], format!("{:0999}", 101));
    assert_eq!(tail[99], "partial");
}

#[tokio::test]
async fn a_file_error_does_not_stop_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the logs directory should be makes every file write fail.
    let logs = dir.path().join("logs");
    fs::write(&logs, "").unwrap();
    let (sink, out) = sink(LogFormat::Text, false, Some(logs));
    sink.attach("web", 0, &b"a\nb\n"[..], &b""[..])
        .await
        .unwrap();
    assert_eq!(out.lines(), ["web.0 | a", "web.0 | b"]);
}

#[tokio::test]
async fn sinks_do_not_share_state() {
    let (one, one_out) = sink(LogFormat::Text, false, None);
    let (two, two_out) = sink(LogFormat::Text, false, None);
    one.attach("a-very-long-name", 0, &b"x\n"[..], &b""[..])
        .await
        .unwrap();
    two.attach("b", 0, &b"y\n"[..], &b""[..]).await.unwrap();
    assert_eq!(one_out.lines(), ["a-very-long-name.0 | x"]);
    assert_eq!(two_out.lines(), ["b.0 | y"]);
}

/// A terminal that takes nothing until it is opened: a stalled `mesh up | less`.
#[derive(Clone)]
struct Stalled {
    open: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    out: Buffer,
}

impl Write for Stalled {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (lock, opened) = &*self.open;
        let mut open = lock.lock().unwrap();
        while !*open {
            open = opened.wait(open).unwrap();
        }
        self.out.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_background_writer_keeps_the_order_and_flush_waits_for_it() {
    let out = Buffer::default();
    let sink = LogSink::new(LogOptions {
        writer: Box::new(out.clone()),
        background: true,
        ..LogOptions::default()
    });
    let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
    sink.attach("web", 0, io::Cursor::new(text.into_bytes()), &b""[..])
        .await
        .unwrap();
    sink.mesh_line("done");
    assert!(sink.flush(Duration::from_secs(10)), "the writer answered");
    let lines = out.lines();
    assert_eq!(lines.len(), 1001);
    for (i, line) in lines[..1000].iter().enumerate() {
        assert_eq!(line, &format!("web.0 | line {i}"));
    }
    assert_eq!(lines[1000], "mesh | done");
}

/// What [`stall_then_release`] saw.
struct Stall {
    /// Every line the terminal got, once released.
    terminal: Vec<String>,
    /// The replica's file, stored lines parsed.
    file: Vec<String>,
    /// The lines the app wrote, in order.
    wrote: Vec<String>,
    logs: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

/// Relay a flood of lines (well past [`TERMINAL_BUFFER`]) to a terminal that takes nothing,
/// on a current-thread runtime (what `mesh up` runs the sidecars on), then print a line of
/// mesh's own, then release the terminal. Panics unless the relay and the runtime kept
/// going while the terminal was stalled.
fn stall_then_release(format: LogFormat, files: bool) -> Stall {
    let dir = tempfile::tempdir().unwrap();
    let logs = files.then(|| dir.path().join("logs"));
    let open = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let out = Buffer::default();
    let terminal = Stalled {
        open: Arc::clone(&open),
        out: out.clone(),
    };
    // About 60 bytes a line, 3 MB in all: more than the buffer and a batch in flight.
    let wrote: Vec<String> = (0..50_000)
        .map(|i| format!("line {i:06} {}", "x".repeat(40)))
        .collect();
    let text: String = wrote.iter().map(|l| format!("{l}\n")).collect();
    let (report, reports) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let sink_logs = logs.clone();
    let runtime = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let sink = LogSink::new(LogOptions {
                format,
                writer: Box::new(terminal),
                logs_dir: sink_logs,
                background: true,
                ..LogOptions::default()
            });
            let relay = sink.attach("web", 0, io::Cursor::new(text.into_bytes()), &b""[..]);
            // Another task on the same thread, as a sidecar would be.
            let (ping, pong) = tokio::sync::oneshot::channel();
            tokio::spawn(async move { ping.send(()).unwrap() });
            pong.await.unwrap();
            report.send("other task ran").unwrap();
            relay.await.unwrap();
            sink.mesh_line("after the flood");
            // The terminal still holds the first batch: nothing can be flushed yet.
            assert!(!sink.flush(Duration::from_millis(50)));
            report.send("relay done").unwrap();
            released.recv().unwrap();
            assert!(sink.flush(Duration::from_secs(10)), "the writer caught up");
        });
    });
    let limit = Duration::from_secs(30);
    assert_eq!(
        reports.recv_timeout(limit),
        Ok("other task ran"),
        "the runtime thread was blocked by the terminal"
    );
    assert_eq!(
        reports.recv_timeout(limit),
        Ok("relay done"),
        "the relay waited for the terminal"
    );
    assert!(out.lines().is_empty(), "the terminal was stalled");
    // Everything is in the file before the terminal reads again.
    let file = match &logs {
        Some(logs) => fs::read_to_string(logs.join("web.0.log"))
            .unwrap()
            .lines()
            .map(|l| parse_file_line(l).unwrap().line)
            .collect(),
        None => Vec::new(),
    };
    let (lock, opened) = &*open;
    *lock.lock().unwrap() = true;
    opened.notify_all();
    release.send(()).unwrap();
    runtime.join().unwrap();
    Stall {
        terminal: out.lines(),
        file,
        wrote,
        logs,
        _dir: dir,
    }
}

/// Check what the terminal showed, as (service or label, line) pairs: runs of the app's
/// lines in order, each gap replaced by exactly one notice of mesh counting the lines of
/// the gap, and mesh's own line last.
fn check_terminal(stall: &Stall, shown: &[(String, String)]) {
    let where_ = match &stall.logs {
        Some(logs) => format!("; all are in {}/", logs.display()),
        None => String::new(),
    };
    let mut next = 0;
    let mut notices = 0;
    let mut after_notice = false;
    let (last, lines) = shown.split_last().unwrap();
    assert_eq!(last, &("mesh".to_owned(), "after the flood".to_owned()));
    for (who, line) in lines {
        if who == "mesh" {
            let (n, rest) = line.split_once(' ').unwrap();
            assert_eq!(rest, format!("lines not shown (terminal too slow){where_}"));
            assert!(!after_notice, "one notice per gap");
            next += n.parse::<usize>().unwrap();
            notices += 1;
            after_notice = true;
        } else {
            after_notice = false;
            assert_eq!(who, "web.0");
            assert_eq!(line, &stall.wrote[next], "line {next}");
            next += 1;
        }
    }
    assert_eq!(next, stall.wrote.len(), "every line shown or counted");
    assert!(notices > 0);
    // The terminal showed the first lines: only a full buffer skips.
    assert_eq!(lines[0].1, stall.wrote[0]);
}

/// Text lines as (label, line).
fn text_pairs(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .map(|l| {
            let (who, line) = l.split_once(" | ").unwrap();
            (who.to_owned(), line.to_owned())
        })
        .collect()
}

#[test]
fn a_stalled_terminal_skips_lines_and_says_where_they_are() {
    let stall = stall_then_release(LogFormat::Text, true);
    assert_eq!(stall.file, stall.wrote, "the file got every line");
    check_terminal(&stall, &text_pairs(&stall.terminal));
}

#[test]
fn the_notice_is_a_json_line_of_mesh() {
    let stall = stall_then_release(LogFormat::Json, true);
    assert_eq!(stall.file, stall.wrote);
    let pairs: Vec<(String, String)> = stall
        .terminal
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let service = v["service"].as_str().unwrap();
            if service == "mesh" {
                assert!(v["replica"].is_null());
                assert_eq!(v["stream"], "stderr");
                assert!(humantime::parse_rfc3339(v["ts"].as_str().unwrap()).is_ok());
            } else {
                assert_eq!(v["replica"], 0);
            }
            let label = if service == "mesh" { "mesh" } else { "web.0" };
            (label.to_owned(), v["line"].as_str().unwrap().to_owned())
        })
        .collect();
    check_terminal(&stall, &pairs);
}

#[test]
fn without_files_the_notice_only_counts() {
    let stall = stall_then_release(LogFormat::Text, false);
    check_terminal(&stall, &text_pairs(&stall.terminal));
}

#[tokio::test]
async fn log_files_are_oldest_first_and_read_in_order_give_every_kept_line() {
    let dir = tempfile::tempdir().unwrap();
    let sink = LogSink::new(LogOptions {
        writer: Box::new(Buffer::default()),
        logs_dir: Some(dir.path().to_owned()),
        max_file_size: 200,
        ..LogOptions::default()
    });
    // Four 41-byte records per file (see files_rotate_and_keep_three).
    let input: String = (0..30).map(|i| format!("line{i:04}\n")).collect();
    sink.attach("db", 0, io::Cursor::new(input.into_bytes()), &b""[..])
        .await
        .unwrap();

    let files = log_files(dir.path(), "db", 0);
    let names: Vec<_> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        ["db.0.log.3", "db.0.log.2", "db.0.log.1", "db.0.log"]
    );
    let lines: Vec<String> = files
        .iter()
        .flat_map(|p| {
            fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| parse_file_line(l).unwrap().line)
                .collect::<Vec<_>>()
        })
        .collect();
    let want: Vec<_> = (16..30).map(|i| format!("line{i:04}")).collect();
    assert_eq!(lines, want);
}

#[test]
fn replicas_in_finds_current_and_rotated_files_of_one_service() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "web.0.log",
        "web.2.log.1",
        "web.2.log",
        "web.11.log.3",
        "web.3.log.4",
        "web.4.log.0",
        "web.x.log",
        "web.5.txt",
        "webby.1.log",
        "api.7.log",
    ] {
        fs::write(dir.path().join(name), "").unwrap();
    }
    assert_eq!(replicas_in(dir.path(), "web").unwrap(), [0, 2, 11]);
    assert_eq!(replicas_in(dir.path(), "webby").unwrap(), [1]);
    assert_eq!(replicas_in(dir.path(), "api").unwrap(), [7]);
    assert!(
        replicas_in(&dir.path().join("missing"), "web")
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn format_line_prints_what_the_sink_prints() {
    for (format, color) in [
        (LogFormat::Text, false),
        (LogFormat::Text, true),
        (LogFormat::Json, false),
    ] {
        let (sink, out) = sink(format, color, None);
        sink.attach("web", 3, &b"hello\n"[..], &b""[..])
            .await
            .unwrap();
        let shown = out.lines().remove(0);
        let ts = "2024-05-06T07:08:09.010Z";
        let formatted = format_line(format, color, "web", 3, Stream::Stdout, ts, "hello").unwrap();
        if format == LogFormat::Json {
            // The sink stamps its own time; everything else is the same.
            let mut a: serde_json::Value = serde_json::from_str(&shown).unwrap();
            let b: serde_json::Value = serde_json::from_str(&formatted).unwrap();
            a["ts"] = ts.into();
            assert_eq!(a, b);
        } else {
            assert_eq!(format!("{shown}\n"), formatted);
        }
    }
}

#[test]
fn tail_lines_leaves_a_line_being_written_for_later() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.log");
    // Lines of 1000 bytes over more than one 64 KiB block, then half a line.
    let mut text: String = (0..200).map(|i| format!("{i:0999}\n")).collect();
    let whole = text.len() as u64;
    text.push_str("partial");
    fs::write(&path, &text).unwrap();
    let mut file = File::open(&path).unwrap();
    let end = text.len() as u64;

    let (lines, offset) = tail_lines(&mut file, end, 100).unwrap();
    assert_eq!(lines.len(), 100);
    assert_eq!(lines[0], format!("{:0999}", 100));
    assert_eq!(lines[99], format!("{:0999}", 199));
    assert_eq!(offset, whole, "the partial line is read again later");

    let (all, _) = tail_lines(&mut file, end, 1000).unwrap();
    assert_eq!(all.len(), 200);
    let (none, offset) = tail_lines(&mut file, end, 0).unwrap();
    assert!(none.is_empty());
    assert_eq!(offset, whole);
    let (first, offset) = tail_lines(&mut file, 1500, 5).unwrap();
    assert_eq!(first, [format!("{:0999}", 0)]);
    assert_eq!(offset, 1000);
    let (empty, offset) = tail_lines(&mut file, 0, 5).unwrap();
    assert!(empty.is_empty());
    assert_eq!(offset, 0);
}
