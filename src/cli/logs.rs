//! `mesh logs [-f] [-n N] [--file FILE] [SERVICE…]` (SPEC §4): the lines of services,
//! past and live, as `mesh up` shows them.
//!
//! # Theory of operation
//!
//! The log files in `state_dir/logs/` are the only source, whether or not a mesh runs.
//! The relays write every line of every replica to its file (`<service>.<replica>.log`,
//! rotated to `.log.1` … `.log.3`), and, unlike the terminal, the files never skip a
//! line, so they are complete; a running mesh appends to them as lines arrive. Reading
//! them is one path for both cases, needs nothing from the running mesh (no control
//! command, no buffer of recent lines in it), and shows the lines of a mesh that has
//! stopped, crashed or was killed as well.
//!
//! Each replica's files are opened first, the current one before the rotated ones, so
//! that a rotation in between shows up as one file under two names (and the opening is
//! tried again). The past lines are then merged in time order: every stored line carries
//! its timestamp, and each replica's files are in order, so a k-way merge of the
//! replicas streams even 40 MiB per replica without holding it. With `-n N`, each
//! service's replicas are read backwards for their last N lines, merged, and cut to the
//! last N of the service (docker compose's `--tail` counts per container; a service is
//! what `mesh logs SERVICE` names, so N counts per service here).
//!
//! `-f` keeps every replica's current file open after the past lines and reads on from
//! where they ended, woken by inotify (the `notify` crate) on the logs directory: a line
//! written, a file created (a new replica, a file after rotation) or renamed (rotation).
//! A file renamed away was closed by its writer first, so it is read to its end before
//! its successor is opened (and the rotated files between them, when a reader held up by
//! its own output finds more than one rotation). The lines found in one wake-up are
//! printed in time order. SIGINT or SIGTERM end it with exit code 0.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use mesh_supervisor::logs::{self, FileRecord, LogFormat, Stream};
use notify::Watcher as _;
use tokio::signal::unix::{SignalKind, signal};

use super::{FileArg, Format};

/// The arguments of `mesh logs`.
#[derive(Debug, clap::Args)]
pub(super) struct LogsArgs {
    /// After the past lines, print new lines as they are written, until Ctrl-C.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only the last N lines of each service (default: every line kept).
    #[arg(short = 'n', long = "tail", value_name = "N")]
    tail: Option<usize>,
    /// Path of mesh.toml (default: ./mesh.toml or the first in a parent directory); `-f`
    /// is `--follow` here, as in docker compose.
    #[arg(long = "file", value_name = "FILE")]
    file: Option<PathBuf>,
    /// Services to show; default all.
    services: Vec<String>,
}

/// Run `mesh logs`.
pub(super) fn run(args: LogsArgs, env: &BTreeMap<String, String>, format: Format) -> ExitCode {
    let config = match super::load(&FileArg { file: args.file }, env) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut services: Vec<String> = Vec::new();
    for s in args.services {
        if !config.services.contains_key(&s) {
            eprintln!("mesh: no service `{s}` in {}", config.path.display());
            return ExitCode::from(1);
        }
        if !services.contains(&s) {
            services.push(s);
        }
    }
    if services.is_empty() {
        services = config.services.keys().cloned().collect();
    }
    let format = match format {
        Format::Text => LogFormat::Text,
        Format::Json => LogFormat::Json,
    };
    let mut printer = Printer {
        out: io::BufWriter::new(Box::new(io::stdout())),
        format,
        color: super::colour(io::stdout().is_terminal(), env),
    };
    // Where `StateDir::logs_dir` puts them.
    let logs_dir = config.mesh.state_dir.join("logs");
    let mut logs = Logs::new(logs_dir, services);
    let result = logs.print_past(args.tail, &mut printer).and_then(|()| {
        if args.follow {
            follow(&mut logs, &mut printer)
        } else {
            Ok(())
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `mesh logs | head`: the reader has all it wanted.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The selected services' log files and how far they have been read.
struct Logs {
    logs_dir: PathBuf,
    services: Vec<String>,
    /// Every replica seen so far: those of the past lines by service (in the order
    /// asked) and replica, then those that appeared while following.
    replicas: Vec<Replica>,
}

/// One replica's current log file, as far as it has been printed.
struct Replica {
    service: String,
    replica: u32,
    /// `<service>.<replica>.log`.
    path: PathBuf,
    /// The file read from, which may have been renamed away since (rotation); `None`
    /// while there is none.
    file: Option<File>,
    /// Just past the last complete line printed: a line still being written is read
    /// again, whole, once its newline is there.
    offset: u64,
    /// The time of the last line read, for a line that has none.
    last_ts: String,
}

/// A replica's files as opened together.
struct Opened {
    /// The rotated files, oldest first.
    rotated: Vec<File>,
    current: Option<File>,
}

/// One stored line, parsed.
struct Entry {
    /// RFC 3339 UTC with milliseconds, fixed width, so that text order is time order.
    ts: String,
    /// Index into [`Logs::replicas`].
    source: usize,
    stream: Stream,
    line: String,
}

/// Formats and writes lines (to stdout).
struct Printer {
    out: io::BufWriter<Box<dyn Write>>,
    format: LogFormat,
    color: bool,
}

/// What wakes the follower: inotify on the logs directory, or on its nearest existing
/// ancestor while it does not exist yet (no mesh has run here).
struct DirWatch {
    watcher: notify::RecommendedWatcher,
    /// The directory watched, and its identity (a directory removed and made again is
    /// another one, and must be watched again).
    watched: Option<(PathBuf, FileId)>,
}

/// Device and inode: what a file is, whatever its name.
type FileId = (u64, u64);

/// Print new lines until SIGINT or SIGTERM.
fn follow(logs: &mut Logs, printer: &mut Printer) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        // A permit is kept while nobody waits, so a burst of events is one wake-up, and an
        // event during a scan is not lost.
        let wake = Arc::new(tokio::sync::Notify::new());
        let notifier = Arc::clone(&wake);
        let watcher = notify::recommended_watcher(move |_: notify::Result<notify::Event>| {
            // Errors (an overflowed event queue) wake too: the scan reads everything new.
            notifier.notify_one();
        })
        .context("cannot watch the log files")?;
        let mut watch = DirWatch {
            watcher,
            watched: None,
        };
        loop {
            // Watch first, then read: whatever is written after the watch is in place
            // wakes the next round, whatever was written before is read now.
            watch.refresh(&logs.logs_dir)?;
            let entries = logs.read_new()?;
            for entry in &entries {
                printer.print(logs, entry)?;
            }
            printer.flush()?;
            tokio::select! {
                _ = sigint.recv() => return Ok(()),
                _ = sigterm.recv() => return Ok(()),
                () = wake.notified() => {}
            }
        }
    })
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Open a replica's files: the current one first, then the rotated ones newest first. A
/// rotation in between makes one file appear under two names; then try again (a writer
/// rotates every 10 MiB, so the second try succeeds), and at the last try keep the first
/// name of each file.
fn open_replica(logs_dir: &Path, service: &str, replica: u32) -> anyhow::Result<Opened> {
    const TRIES: usize = 3;
    let paths = logs::log_files(logs_dir, service, replica);
    let mut attempt = 1;
    loop {
        let mut seen: HashSet<FileId> = HashSet::new();
        let mut distinct = true;
        // Newest first.
        let mut files: Vec<Option<File>> = Vec::new();
        for path in paths.iter().rev() {
            let file = match open_if_exists(path)? {
                Some(file) => {
                    let id = file_id(&file).with_context(|| cannot_read(path))?;
                    if seen.insert(id) {
                        Some(file)
                    } else {
                        distinct = false;
                        None
                    }
                }
                None => None,
            };
            files.push(file);
        }
        if distinct || attempt == TRIES {
            let current = files.remove(0);
            let rotated = files.into_iter().rev().flatten().collect();
            return Ok(Opened { rotated, current });
        }
        attempt += 1;
    }
}

fn open_if_exists(path: &Path) -> anyhow::Result<Option<File>> {
    match File::open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| cannot_read(path)),
    }
}

fn file_id(file: &File) -> io::Result<FileId> {
    let meta = file.metadata()?;
    Ok((meta.dev(), meta.ino()))
}

fn cannot_read(path: &Path) -> String {
    format!("cannot read {}", path.display())
}

/// Parse a stored line; one that does not parse (written by hand?) is shown whole, at
/// the time of the line before it.
fn entry(raw: &[u8], source: usize, last_ts: &mut String) -> Entry {
    let raw = String::from_utf8_lossy(raw);
    let raw = raw.strip_suffix('\n').unwrap_or(&raw);
    match logs::parse_file_line(raw) {
        Some(FileRecord { ts, stream, line }) => {
            last_ts.clone_from(&ts);
            Entry {
                ts,
                source,
                stream,
                line,
            }
        }
        None => Entry {
            ts: last_ts.clone(),
            source,
            stream: Stream::Stdout,
            line: raw.to_owned(),
        },
    }
}

/// Merge sources that are each in time order into one in time order; ties keep the
/// order of the sources. Streams: holds one entry per source.
fn merge<'a>(
    mut sources: Vec<Box<dyn Iterator<Item = anyhow::Result<Entry>> + 'a>>,
    mut each: impl FnMut(Entry) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    /// The next entry of source `from`; the heap's order is the reverse of time order,
    /// so that it pops the oldest.
    struct Head {
        entry: Entry,
        from: usize,
    }
    impl Ord for Head {
        fn cmp(&self, other: &Self) -> Ordering {
            (&other.entry.ts, other.from).cmp(&(&self.entry.ts, self.from))
        }
    }
    impl PartialOrd for Head {
        fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
            Some(self.cmp(other))
        }
    }
    impl PartialEq for Head {
        fn eq(&self, other: &Self) -> bool {
            self.cmp(other) == Ordering::Equal
        }
    }
    impl Eq for Head {}

    let mut heap = BinaryHeap::new();
    for (from, source) in sources.iter_mut().enumerate() {
        if let Some(entry) = source.next().transpose()? {
            heap.push(Head { entry, from });
        }
    }
    while let Some(Head { entry, from }) = heap.pop() {
        if let Some(next) = sources[from].next().transpose()? {
            heap.push(Head { entry: next, from });
        }
        each(entry)?;
    }
    Ok(())
}

/// Every line of a replica's files from the oldest on, as of when they were opened: the
/// rotated files whole, the current one up to its last complete line.
struct PastReader {
    rotated: std::vec::IntoIter<File>,
    reading: Option<BufReader<File>>,
    /// The current file, limited to its length when opened.
    current: Option<BufReader<io::Take<File>>>,
    /// Bytes of complete lines read from the current file.
    current_read: u64,
    source: usize,
    last_ts: String,
    /// Where the lines came from, for errors.
    path: PathBuf,
}

impl Iterator for PastReader {
    type Item = anyhow::Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut raw = Vec::new();
        loop {
            if self.reading.is_none() {
                self.reading = self.rotated.next().map(BufReader::new);
            }
            if let Some(reader) = &mut self.reading {
                match reader.read_until(b'\n', &mut raw) {
                    // A rotated file is complete, even a last line without its newline.
                    Ok(0) => self.reading = None,
                    Ok(_) => return Some(Ok(entry(&raw, self.source, &mut self.last_ts))),
                    Err(e) => return Some(Err(e).with_context(|| cannot_read(&self.path))),
                }
                continue;
            }
            let current = self.current.as_mut()?;
            return match current.read_until(b'\n', &mut raw) {
                Ok(n) if n > 0 && raw.ends_with(b"\n") => {
                    self.current_read += n as u64;
                    Some(Ok(entry(&raw, self.source, &mut self.last_ts)))
                }
                // The end, or a line still being written: `-f` reads it whole later.
                Ok(_) => {
                    self.current = None;
                    None
                }
                Err(e) => Some(Err(e).with_context(|| cannot_read(&self.path))),
            };
        }
    }
}

// === impl Logs ===

impl Logs {
    fn new(logs_dir: PathBuf, services: Vec<String>) -> Logs {
        Logs {
            logs_dir,
            services,
            replicas: Vec::new(),
        }
    }

    /// Print what the files hold now: everything, or the last `tail` lines of each
    /// service, in time order. Leaves every replica's current file open, read up to its
    /// last complete line, for [`Logs::read_new`].
    fn print_past(&mut self, tail: Option<usize>, printer: &mut Printer) -> anyhow::Result<()> {
        let mut opened = Vec::new();
        for service in self.services.clone() {
            let replicas = logs::replicas_in(&self.logs_dir, &service)
                .with_context(|| cannot_read(&self.logs_dir))?;
            for replica in replicas {
                let files = open_replica(&self.logs_dir, &service, replica)?;
                self.add(&service, replica, files.current.as_ref())?;
                opened.push(files);
            }
        }
        match tail {
            None => self.print_all(opened, printer)?,
            Some(n) => self.print_tail(opened, n, printer)?,
        }
        printer.flush()?;
        Ok(())
    }

    /// Every line, merged across all replicas.
    fn print_all(&mut self, opened: Vec<Opened>, printer: &mut Printer) -> anyhow::Result<()> {
        let mut readers = Vec::new();
        for (source, files) in opened.into_iter().enumerate() {
            let current = match files.current {
                Some(file) => {
                    let path = &self.replicas[source].path;
                    let len = file.metadata().with_context(|| cannot_read(path))?.len();
                    Some(BufReader::new(file.take(len)))
                }
                None => None,
            };
            readers.push(PastReader {
                rotated: files.rotated.into_iter(),
                reading: None,
                current,
                current_read: 0,
                source,
                last_ts: String::new(),
                path: self.replicas[source].path.clone(),
            });
        }
        let sources = readers
            .iter_mut()
            .map(|r| Box::new(r) as Box<dyn Iterator<Item = anyhow::Result<Entry>>>)
            .collect();
        merge(sources, |entry| printer.print(self, &entry))?;
        for (replica, reader) in self.replicas.iter_mut().zip(&readers) {
            replica.offset = reader.current_read;
        }
        Ok(())
    }

    /// The last `n` lines of each service, merged.
    fn print_tail(
        &mut self,
        opened: Vec<Opened>,
        n: usize,
        printer: &mut Printer,
    ) -> anyhow::Result<()> {
        // Each replica's last `n`, oldest first.
        let mut per_replica: Vec<Vec<Entry>> = Vec::new();
        for (source, files) in opened.into_iter().enumerate() {
            let path = self.replicas[source].path.clone();
            // Newest first: the current file, then the rotated ones.
            let mut raw: Vec<Vec<String>> = Vec::new();
            let mut found = 0;
            if let Some(mut file) = files.current {
                let len = file.metadata().with_context(|| cannot_read(&path))?.len();
                let (lines, end) =
                    logs::tail_lines(&mut file, len, n).with_context(|| cannot_read(&path))?;
                // `-f` goes on from the end of the last complete line.
                self.replicas[source].offset = end;
                found += lines.len();
                raw.push(lines);
            }
            for mut file in files.rotated.into_iter().rev() {
                if found >= n {
                    break;
                }
                let len = file.metadata().with_context(|| cannot_read(&path))?.len();
                let (lines, _) = logs::tail_lines(&mut file, len, n - found)
                    .with_context(|| cannot_read(&path))?;
                found += lines.len();
                raw.push(lines);
            }
            let mut last_ts = String::new();
            let entries = raw
                .into_iter()
                .rev()
                .flatten()
                .map(|l| entry(l.as_bytes(), source, &mut last_ts))
                .collect();
            per_replica.push(entries);
        }
        // Each service's last `n`, merged across its replicas.
        let mut per_service: Vec<Vec<Entry>> = Vec::new();
        let mut replicas = per_replica.into_iter().zip(&self.replicas).peekable();
        while let Some((first, replica)) = replicas.next() {
            let mut group = vec![first];
            while let Some((entries, _)) =
                replicas.next_if(|(_, next)| next.service == replica.service)
            {
                group.push(entries);
            }
            let mut merged = Vec::new();
            merge(in_order(group), |entry| {
                merged.push(entry);
                Ok(())
            })?;
            let skip = merged.len().saturating_sub(n);
            merged.drain(..skip);
            per_service.push(merged);
        }
        merge(in_order(per_service), |entry| printer.print(self, &entry))
    }

    /// Start tracking a replica whose current file is `current` (a handle of its own).
    fn add(&mut self, service: &str, replica: u32, current: Option<&File>) -> anyhow::Result<()> {
        let path = logs::log_file(&self.logs_dir, service, replica);
        let file = match current {
            Some(file) => Some(file.try_clone().with_context(|| cannot_read(&path))?),
            None => None,
        };
        self.replicas.push(Replica {
            service: service.to_owned(),
            replica,
            path,
            file,
            offset: 0,
            last_ts: String::new(),
        });
        Ok(())
    }

    /// The lines written since the last look, in time order: the rest of each current
    /// file, its successor after a rotation, and every line of replicas that appeared.
    fn read_new(&mut self) -> anyhow::Result<Vec<Entry>> {
        let mut entries = Vec::new();
        for service in self.services.clone() {
            let replicas = logs::replicas_in(&self.logs_dir, &service)
                .with_context(|| cannot_read(&self.logs_dir))?;
            for replica in replicas {
                let known = self
                    .replicas
                    .iter()
                    .any(|r| r.service == service && r.replica == replica);
                if known {
                    continue;
                }
                // A replica started since: all of its lines are new.
                let files = open_replica(&self.logs_dir, &service, replica)?;
                let source = self.replicas.len();
                self.add(&service, replica, files.current.as_ref())?;
                let replica = &mut self.replicas[source];
                for file in files.rotated {
                    read_whole(
                        file,
                        &replica.path,
                        source,
                        &mut replica.last_ts,
                        &mut entries,
                    )?;
                }
            }
        }
        for (source, replica) in self.replicas.iter_mut().enumerate() {
            replica.read_new(source, &mut entries)?;
        }
        // Stable: each replica's lines keep their order.
        entries.sort_by(|a, b| a.ts.cmp(&b.ts));
        Ok(entries)
    }
}

/// Append every line of a (rotated) file to `entries`.
fn read_whole(
    file: File,
    path: &Path,
    source: usize,
    last_ts: &mut String,
    entries: &mut Vec<Entry>,
) -> anyhow::Result<()> {
    for raw in BufReader::new(file).split(b'\n') {
        let raw = raw.with_context(|| cannot_read(path))?;
        entries.push(entry(&raw, source, last_ts));
    }
    Ok(())
}

/// Sources of entries already in memory.
fn in_order<'a>(
    lists: Vec<Vec<Entry>>,
) -> Vec<Box<dyn Iterator<Item = anyhow::Result<Entry>> + 'a>> {
    lists
        .into_iter()
        .map(|l| Box::new(l.into_iter().map(Ok)) as Box<dyn Iterator<Item = _>>)
        .collect()
}

// === impl Replica ===

impl Replica {
    /// Append the complete lines written since the last call to `entries`, following
    /// the file across a rotation.
    fn read_new(&mut self, source: usize, entries: &mut Vec<Entry>) -> anyhow::Result<()> {
        loop {
            if self.file.is_none() {
                match open_if_exists(&self.path)? {
                    Some(file) => {
                        self.file = Some(file);
                        self.offset = 0;
                    }
                    // Between the rotation's rename and the next line's new file.
                    None => return Ok(()),
                }
            }
            self.read_available(source, entries)?;
            if !self.renamed()? {
                return Ok(());
            }
            // Rotated away. The writer closed the file before renaming it, so what it
            // wrote between the read above and the rename is there now, and nothing
            // after: read it to its end, then go on with its successors.
            self.read_available(source, entries)?;
            if let Some(file) = self.file.take() {
                for skipped in self.rotated_after(&file)? {
                    read_whole(skipped, &self.path, source, &mut self.last_ts, entries)?;
                }
            }
        }
    }

    /// The rotated files newer than `file`, oldest first. After one rotation there are
    /// none (`file` is `.log.1`), but a reader held up by its own output (`mesh logs -f |
    /// less`, paused) may find `file` at `.log.2` or `.log.3`: the files after it are all
    /// new. When `file` is among none of them (dropped after a fourth rotation, or
    /// removed by hand), which of them are new cannot be told, and none is read.
    fn rotated_after(&self, file: &File) -> anyhow::Result<Vec<File>> {
        let ours = file_id(file).with_context(|| cannot_read(&self.path))?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut newer = Vec::new();
        // Newest first: `.log.1`, `.log.2`, `.log.3`.
        for path in logs::log_files(dir, &self.service, self.replica)
            .iter()
            .rev()
            .skip(1)
        {
            let Some(rotated) = open_if_exists(path)? else {
                continue;
            };
            if file_id(&rotated).with_context(|| cannot_read(path))? == ours {
                newer.reverse();
                return Ok(newer);
            }
            newer.push(rotated);
        }
        Ok(Vec::new())
    }

    /// Append the complete lines after `offset` in the open file.
    fn read_available(&mut self, source: usize, entries: &mut Vec<Entry>) -> anyhow::Result<()> {
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        let len = file
            .metadata()
            .with_context(|| cannot_read(&self.path))?
            .len();
        if len < self.offset {
            // Truncated by hand: start again from the top.
            self.offset = 0;
        }
        let mut new = Vec::new();
        file.seek(SeekFrom::Start(self.offset))
            .and_then(|_| file.read_to_end(&mut new))
            .with_context(|| cannot_read(&self.path))?;
        // Up to the last newline: a line still being written waits for the next look.
        if let Some(last) = new.iter().rposition(|&b| b == b'\n') {
            for raw in new[..last].split(|&b| b == b'\n') {
                entries.push(entry(raw, source, &mut self.last_ts));
            }
            self.offset += last as u64 + 1;
        }
        Ok(())
    }

    /// Whether the open file is no longer the one at `path` (renamed by a rotation, or
    /// removed).
    fn renamed(&self) -> anyhow::Result<bool> {
        let Some(file) = &self.file else {
            return Ok(false);
        };
        match fs::metadata(&self.path) {
            Ok(meta) => Ok((meta.dev(), meta.ino()) != file_id(file)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(e).with_context(|| cannot_read(&self.path)),
        }
    }
}

// === impl Printer ===

impl Printer {
    fn print(&mut self, logs: &Logs, entry: &Entry) -> anyhow::Result<()> {
        let replica = &logs.replicas[entry.source];
        let Some(text) = logs::format_line(
            self.format,
            self.color,
            &replica.service,
            replica.replica,
            entry.stream,
            &entry.ts,
            &entry.line,
        ) else {
            return Ok(());
        };
        self.out
            .write_all(text.as_bytes())
            .context("cannot write to stdout")
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.out.flush().context("cannot write to stdout")
    }
}

// === impl DirWatch ===

impl DirWatch {
    /// Watch `logs_dir`, or while it does not exist its nearest existing ancestor (to see
    /// it created); move the watch when that changes.
    fn refresh(&mut self, logs_dir: &Path) -> anyhow::Result<()> {
        loop {
            let target = logs_dir
                .ancestors()
                .find_map(|dir| {
                    let meta = fs::metadata(dir).ok()?;
                    Some((dir.to_owned(), (meta.dev(), meta.ino())))
                })
                .context("no directory to watch")?;
            if self.watched.as_ref() == Some(&target) {
                return Ok(());
            }
            if let Some((old, _)) = self.watched.take() {
                // Gone with its directory, maybe.
                let _ = self.watcher.unwatch(&old);
            }
            self.watcher
                .watch(&target.0, notify::RecursiveMode::NonRecursive)
                .with_context(|| format!("cannot watch {}", target.0.display()))?;
            // Looked at again: what was made meanwhile is watched next round.
            self.watched = Some(target);
        }
    }
}

#[cfg(test)]
mod tests;
