#![allow(clippy::unwrap_used, reason = "a failing test panics")]

use std::fs::OpenOptions;

use parking_lot::Mutex;

use super::*;

/// An in-memory stdout.
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
    /// The lines written since the last call.
    fn take(&self) -> Vec<String> {
        let bytes = std::mem::take(&mut *self.0.lock());
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

fn printer(format: LogFormat) -> (Printer, Buffer) {
    let buffer = Buffer::default();
    let printer = Printer {
        out: io::BufWriter::new(Box::new(buffer.clone())),
        format,
        color: false,
    };
    (printer, buffer)
}

/// A stored line at second `s` (of one minute).
fn rec(s: u32, line: &str) -> String {
    format!("2024-01-02T03:04:{s:02}.000Z stdout {line}\n")
}

fn append(path: &Path, text: &str) {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

/// Rotate as the writer does: `.2` to `.3`, `.1` to `.2`, the current file to `.1`.
fn rotate(current: &Path) {
    let name = |i: u32| PathBuf::from(format!("{}.{i}", current.display()));
    for i in (1..3).rev() {
        if name(i).exists() {
            fs::rename(name(i), name(i + 1)).unwrap();
        }
    }
    fs::rename(current, name(1)).unwrap();
}

fn open_logs(dir: &Path, services: &[&str]) -> Logs {
    Logs::new(
        dir.to_owned(),
        services.iter().map(|s| s.to_string()).collect(),
    )
}

/// Print the past, then what `read_new` finds.
fn read_new(logs: &mut Logs, printer: &mut Printer, out: &Buffer) -> Vec<String> {
    for entry in logs.read_new().unwrap() {
        printer.print(logs, &entry).unwrap();
    }
    printer.flush().unwrap();
    out.take()
}

#[test]
fn past_lines_of_all_replicas_merge_in_time_order_across_rotated_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("web.0.log.2"), rec(1, "w1")).unwrap();
    fs::write(d.join("web.0.log.1"), rec(3, "w3") + &rec(5, "w5")).unwrap();
    fs::write(d.join("web.0.log"), rec(7, "w7")).unwrap();
    fs::write(d.join("web.1.log"), rec(4, "v4") + "not a record\n").unwrap();
    fs::write(
        d.join("api.0.log"),
        rec(2, "a2") + &rec(5, "a5") + &rec(9, "a9"),
    )
    .unwrap();
    // Neither selected nor a log file of a selected service.
    fs::write(d.join("db.0.log"), rec(6, "d6")).unwrap();
    fs::write(d.join("web.0.txt"), rec(6, "x6")).unwrap();

    let (mut printer, out) = printer(LogFormat::Text);
    let mut logs = open_logs(d, &["web", "api"]);
    logs.print_past(None, &mut printer).unwrap();
    assert_eq!(
        out.take(),
        [
            "web.0 | w1",
            "api.0 | a2",
            "web.0 | w3",
            "web.1 | v4",
            // The line that does not parse stays after the line before it.
            "web.1 | not a record",
            // A tie keeps the order of the services asked for.
            "web.0 | w5",
            "api.0 | a5",
            "web.0 | w7",
            "api.0 | a9",
        ]
    );
}

#[test]
fn tail_is_the_last_lines_of_each_service() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("web.0.log.1"), rec(1, "w1") + &rec(3, "w3")).unwrap();
    fs::write(d.join("web.0.log"), rec(5, "w5")).unwrap();
    fs::write(d.join("web.1.log"), rec(2, "v2") + &rec(6, "v6")).unwrap();
    fs::write(
        d.join("api.0.log"),
        rec(0, "a0") + &rec(4, "a4") + &rec(8, "a8"),
    )
    .unwrap();

    let (mut printer, out) = printer(LogFormat::Text);
    open_logs(d, &["web", "api"])
        .print_past(Some(3), &mut printer)
        .unwrap();
    // web's last three across its replicas and files; api's last three.
    assert_eq!(
        out.take(),
        [
            "api.0 | a0",
            "web.0 | w3",
            "api.0 | a4",
            "web.0 | w5",
            "web.1 | v6",
            "api.0 | a8"
        ]
    );
    open_logs(d, &["api"])
        .print_past(Some(0), &mut printer)
        .unwrap();
    assert!(out.take().is_empty());
    open_logs(d, &["web"])
        .print_past(Some(100), &mut printer)
        .unwrap();
    assert_eq!(out.take().len(), 5);
}

#[test]
fn json_lines_carry_the_stored_time_and_stream() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("web.2.log"),
        "2024-01-02T03:04:05.678Z stderr oops\n",
    )
    .unwrap();
    let (mut printer, out) = printer(LogFormat::Json);
    open_logs(dir.path(), &["web"])
        .print_past(None, &mut printer)
        .unwrap();
    let lines = out.take();
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "ts": "2024-01-02T03:04:05.678Z",
            "service": "web",
            "replica": 2,
            "stream": "stderr",
            "line": "oops",
        })
    );
}

#[test]
fn following_reads_new_lines_whole_across_rotation_and_new_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let current = d.join("web.0.log");
    // A line still being written when the past is read.
    fs::write(&current, rec(1, "one") + "2024-01-02T03:04:02.000Z std").unwrap();
    let (mut printer, out) = printer(LogFormat::Text);
    let mut logs = open_logs(d, &["web"]);
    logs.print_past(None, &mut printer).unwrap();
    assert_eq!(out.take(), ["web.0 | one"]);
    assert!(read_new(&mut logs, &mut printer, &out).is_empty());

    // Its end arrives; then more.
    append(&current, "out two\n");
    append(&current, &rec(3, "three"));
    assert_eq!(
        read_new(&mut logs, &mut printer, &out),
        ["web.0 | two", "web.0 | three"]
    );

    // Rotation: a last line, the rename, then the new file (and a file for a new replica).
    append(&current, &rec(4, "four"));
    fs::rename(&current, d.join("web.0.log.1")).unwrap();
    assert_eq!(read_new(&mut logs, &mut printer, &out), ["web.0 | four"]);
    fs::write(&current, rec(5, "five")).unwrap();
    fs::write(d.join("web.1.log"), rec(4, "new replica")).unwrap();
    assert_eq!(
        read_new(&mut logs, &mut printer, &out),
        ["web.1 | new replica", "web.0 | five"]
    );

    // Rotated and written again before a look: both files' lines, in order.
    append(&current, &rec(6, "six"));
    fs::rename(&current, d.join("web.0.log.1")).unwrap();
    fs::write(&current, rec(7, "seven")).unwrap();
    assert_eq!(
        read_new(&mut logs, &mut printer, &out),
        ["web.0 | six", "web.0 | seven"]
    );

    // Rotated twice before a look (a reader held up by its own output): the file in
    // between is read too.
    append(&current, &rec(8, "eight"));
    rotate(&current);
    fs::write(&current, rec(9, "nine")).unwrap();
    rotate(&current);
    fs::write(&current, rec(10, "ten")).unwrap();
    assert_eq!(
        read_new(&mut logs, &mut printer, &out),
        ["web.0 | eight", "web.0 | nine", "web.0 | ten"]
    );

    // Truncated by hand: from the top again.
    fs::write(&current, rec(11, "11")).unwrap();
    assert_eq!(read_new(&mut logs, &mut printer, &out), ["web.0 | 11"]);
    assert!(read_new(&mut logs, &mut printer, &out).is_empty());
}

#[test]
fn following_after_a_tail_goes_on_from_the_end_of_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let current = dir.path().join("web.0.log");
    fs::write(&current, rec(1, "one") + &rec(2, "two")).unwrap();
    let (mut printer, out) = printer(LogFormat::Text);
    let mut logs = open_logs(dir.path(), &["web"]);
    logs.print_past(Some(1), &mut printer).unwrap();
    assert_eq!(out.take(), ["web.0 | two"]);
    append(&current, &rec(3, "three"));
    assert_eq!(read_new(&mut logs, &mut printer, &out), ["web.0 | three"]);

    let mut logs = open_logs(dir.path(), &["web"]);
    logs.print_past(Some(0), &mut printer).unwrap();
    append(&current, &rec(4, "four"));
    assert_eq!(read_new(&mut logs, &mut printer, &out), ["web.0 | four"]);
}

#[test]
fn a_missing_logs_directory_has_no_lines_until_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let logs_dir = dir.path().join("state/logs");
    let (mut printer, out) = printer(LogFormat::Text);
    let mut logs = open_logs(&logs_dir, &["web"]);
    logs.print_past(None, &mut printer).unwrap();
    assert!(out.take().is_empty());
    assert!(read_new(&mut logs, &mut printer, &out).is_empty());
    fs::create_dir_all(&logs_dir).unwrap();
    fs::write(logs_dir.join("web.0.log.1"), rec(1, "old")).unwrap();
    fs::write(logs_dir.join("web.0.log"), rec(2, "new")).unwrap();
    assert_eq!(
        read_new(&mut logs, &mut printer, &out),
        ["web.0 | old", "web.0 | new"]
    );
}

#[test]
fn a_rotation_while_opening_does_not_show_a_file_twice() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("web.0.log.1"), rec(1, "old")).unwrap();
    fs::write(d.join("web.0.log"), rec(2, "new")).unwrap();
    let opened = open_replica(d, "web", 0).unwrap();
    assert_eq!(opened.rotated.len(), 1);
    assert!(opened.current.is_some());
    // The same file under two names (what a rotation between two opens looks like): at
    // the last try, each file is kept once, under its newest name.
    fs::remove_file(d.join("web.0.log.1")).unwrap();
    fs::hard_link(d.join("web.0.log"), d.join("web.0.log.1")).unwrap();
    let opened = open_replica(d, "web", 0).unwrap();
    assert!(opened.rotated.is_empty());
    assert!(opened.current.is_some());
}
