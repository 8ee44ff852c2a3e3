//! The processes around the benchmark: the `mesh up` child and the peers' proxies
//! (started, watched, always stopped), and what `/proc` says about them and the
//! application (CPU time, peak RSS).

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead as _, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, SysconfVar, sysconf};

/// How many lines of mesh's output an error message shows.
const TAIL: usize = 40;

/// A scratch directory under the system temp dir, unique per process, removed on drop.
pub(crate) struct ScratchDir(PathBuf);

impl ScratchDir {
    pub(crate) fn new() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("mesh-bench-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process of the bench: `mesh up`, `mesh-floor`, or a peer's proxy. Dropping it
/// stops it (SIGTERM, then SIGKILL), so no error path leaves processes behind.
pub(crate) struct ChildProcess {
    child: Child,
    /// Its executable's file name, for messages.
    name: String,
    reaped: bool,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<VecDeque<String>>>,
    /// Closed when its stderr has been read to the end.
    stderr_done: Receiver<()>,
}

impl ChildProcess {
    /// Runs `<mesh> up -f <config>` in `cwd`, relaying nothing: stdout lines go to a
    /// channel (read by a thread for the whole run, so mesh never blocks on its output),
    /// the last lines of stderr are kept for error messages.
    pub(crate) fn start(mesh: &Path, config: &Path, cwd: &Path) -> anyhow::Result<Self> {
        let mut command = Command::new(mesh);
        command
            .arg("up")
            .arg("-f")
            .arg(config)
            .current_dir(cwd)
            .env_remove("MESH_LOG");
        Self::spawn(command)
    }

    /// Runs `command` the same way: its stdout lines to the channel, the tail of its
    /// stderr kept (used for `mesh-floor` and the peers too).
    pub(crate) fn spawn(mut command: Command) -> anyhow::Result<Self> {
        let program = Path::new(command.get_program());
        let name = program
            .file_name()
            .unwrap_or(program.as_os_str())
            .to_string_lossy()
            .into_owned();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", command.get_program().to_string_lossy()))?;
        let (tx, lines) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        // Nobody listens any more: keep draining so mesh never blocks.
                        continue;
                    }
                }
            });
        }
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let (done, stderr_done) = mpsc::channel();
        if let Some(err) = child.stderr.take() {
            let keep = Arc::clone(&stderr);
            std::thread::spawn(move || {
                drain_tail(err, &keep);
                drop(done);
            });
        }
        Ok(Self {
            child,
            name,
            reaped: false,
            lines,
            seen: Vec::new(),
            stderr,
            stderr_done,
        })
    }

    pub(crate) fn pid(&self) -> i32 {
        // A pid always fits in i32 on Linux.
        i32::try_from(self.child.id()).unwrap_or(i32::MAX)
    }

    /// The first output line containing `needle`, waiting until `deadline`.
    pub(crate) fn wait_line(&mut self, needle: &str, deadline: Instant) -> anyhow::Result<String> {
        let mut checked = 0;
        loop {
            if let Some(line) = self.seen[checked..].iter().find(|l| l.contains(needle)) {
                return Ok(line.clone());
            }
            checked = self.seen.len();
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "timed out waiting for {} to print {needle:?}\n{}",
                        self.name,
                        self.context()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.wait_for_exit(Duration::from_secs(5));
                    bail!(
                        "{} closed its output ({}) before printing {needle:?}\n{}",
                        self.name,
                        status.map_or_else(|| "still running".to_owned(), |s| s.to_string()),
                        self.context()
                    )
                }
            }
        }
    }

    /// The last lines it printed on stdout and stderr, for error messages.
    pub(crate) fn context(&self) -> String {
        let mut s = format!("--- {} stdout (last lines) ---\n", self.name);
        let from = self.seen.len().saturating_sub(TAIL);
        for l in &self.seen[from..] {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str(&format!("--- {} stderr (last lines) ---\n", self.name));
        if let Ok(err) = self.stderr.lock() {
            for l in err.iter() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// SIGTERM (mesh's graceful stop), then SIGKILL if it has not exited by `timeout`.
    pub(crate) fn stop(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if !self.reaped {
            let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        }
        if let Some(status) = self.wait_for_exit(timeout) {
            return Ok(status);
        }
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .with_context(|| format!("waiting for {}", self.name))?;
        self.reaped = true;
        bail!(
            "{} did not exit within {timeout:?} of SIGTERM; killed ({status})",
            self.name
        )
    }

    /// Its exit status, if it has exited; then its last words are in [`Self::context`]
    /// (unless a process it left behind holds its stderr open for more than a second).
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.wait_for_exit(Duration::ZERO)?;
        let _ = self.stderr_done.recv_timeout(Duration::from_secs(1));
        Some(status)
    }

    fn wait_for_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.reaped = true;
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => return None,
            }
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.stop(Duration::from_secs(10));
        }
    }
}

fn drain_tail(from: impl Read, keep: &Mutex<VecDeque<String>>) {
    for line in BufReader::new(from).lines() {
        let Ok(line) = line else { break };
        if let Ok(mut k) = keep.lock() {
            if k.len() == TAIL {
                k.pop_front();
            }
            k.push_back(line);
        }
    }
}

/// The fields of `/proc/<pid>/stat` the benchmark uses.
pub(crate) struct Stat {
    pub(crate) comm: String,
    pub(crate) ppid: i32,
    /// utime + stime, in clock ticks.
    pub(crate) cpu_ticks: u64,
}

pub(crate) fn stat(pid: i32) -> anyhow::Result<Stat> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat(&text).with_context(|| format!("parsing {path}: {text:?}"))
}

fn parse_stat(text: &str) -> anyhow::Result<Stat> {
    // `pid (comm) state ppid …`; comm may hold spaces and parentheses: split at the last ')'.
    let open = text.find('(').context("no '('")?;
    let close = text.rfind(')').context("no ')'")?;
    let comm = text[open + 1..close].to_owned();
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let field = |n: usize| -> anyhow::Result<u64> {
        rest.get(n - 3)
            .context("too few fields")?
            .parse::<u64>()
            .with_context(|| format!("field {n}"))
    };
    Ok(Stat {
        comm,
        ppid: i32::try_from(field(4)?).context("ppid")?,
        cpu_ticks: field(14)? + field(15)?,
    })
}

/// Clock ticks per second for `/proc/*/stat` times.
pub(crate) fn clock_ticks() -> u64 {
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => u64::try_from(t).unwrap_or(100),
        _ => 100,
    }
}

/// CPU time used so far by a process. `stat` (utime + stime) counts every thread that
/// ever ran, at clock-tick resolution; the sum of the live threads' `schedstat` is in
/// nanoseconds but misses threads that exited, so it is used only when the set of
/// threads did not change between two samples.
#[derive(Clone)]
pub(crate) struct CpuSample {
    ticks: u64,
    threads: BTreeMap<u32, u64>,
}

pub(crate) fn cpu_sample(pid: i32) -> anyhow::Result<CpuSample> {
    let ticks = stat(pid)?.cpu_ticks;
    let mut threads = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for entry in dir.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let Ok(s) = std::fs::read_to_string(entry.path().join("schedstat")) else {
                continue;
            };
            if let Some(ns) = s.split_whitespace().next().and_then(|f| f.parse().ok()) {
                threads.insert(tid, ns);
            }
        }
    }
    Ok(CpuSample { ticks, threads })
}

/// CPU time between two samples of one process, in microseconds.
pub(crate) fn cpu_between(before: &CpuSample, after: &CpuSample, ticks_per_s: u64) -> f64 {
    let same_threads = !before.threads.is_empty()
        && before.threads.len() == after.threads.len()
        && before.threads.keys().eq(after.threads.keys());
    if same_threads {
        let ns: u64 = after
            .threads
            .iter()
            .map(|(tid, a)| a.saturating_sub(before.threads.get(tid).copied().unwrap_or(0)))
            .sum();
        ns as f64 / 1_000.0
    } else {
        after.ticks.saturating_sub(before.ticks) as f64 * 1e6 / ticks_per_s as f64
    }
}

/// The whole machine's CPU time so far, in clock ticks: busy (user, nice, system, irq,
/// softirq) and steal (taken by the hypervisor), from the first line of `/proc/stat`.
pub(crate) fn machine_cpu_ticks() -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text.lines().next().unwrap_or_default();
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    Ok((at(0) + at(1) + at(2) + at(5) + at(6), at(7)))
}

/// The processes mesh started: its shims (children of mesh) and the application
/// processes named `comm` below them.
pub(crate) fn find_below(mesh_pid: i32, comm: &str) -> anyhow::Result<(Vec<i32>, Vec<i32>)> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .context("reading /proc")?
        .flatten()
    {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(s) = stat(pid) {
            all.push((pid, s));
        }
    }
    let shims: Vec<i32> = all
        .iter()
        .filter(|(_, s)| s.ppid == mesh_pid)
        .map(|(p, _)| *p)
        .collect();
    let apps = all
        .iter()
        .filter(|(_, s)| shims.contains(&s.ppid) && s.comm == comm)
        .map(|(p, _)| *p)
        .collect();
    Ok((shims, apps))
}

/// Every process below `root` (children, their children, …), from one scan of `/proc`.
pub(crate) fn descendants(root: i32) -> anyhow::Result<Vec<i32>> {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .context("reading /proc")?
        .flatten()
    {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(s) = stat(pid) {
            parents.push((pid, s.ppid));
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    found.remove(0);
    Ok(found)
}

/// Whether `pid` runs (a zombie, already dead but not yet reaped, does not).
pub(crate) fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => text
            .rfind(')')
            .and_then(|i| text[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

/// A `Vm…:` line of `/proc/<pid>/status`, in KiB.
pub(crate) fn status_kib(pid: i32, key: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in {path}"))
}

/// What the results were measured on.
pub(crate) struct Machine {
    pub(crate) cpus: usize,
    pub(crate) cpu_model: String,
    pub(crate) kernel: String,
    pub(crate) memory: String,
    pub(crate) date: String,
    pub(crate) commit: String,
}

pub(crate) fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kib: u64 = m
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some(format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "unknown".to_owned());
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        kernel,
        memory,
        date: utc_now(),
        commit: git_commit(),
    }
}

fn git_commit() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(commit) if !commit.is_empty() => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{commit} (with uncommitted changes)")
            } else {
                commit
            }
        }
        _ => "unknown".to_owned(),
    }
}

/// Now, as `YYYY-MM-DD HH:MM UTC`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3_600,
        rem % 3_600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_comm() {
        let s =
            parse_stat("42 (a) b (c)) S 7 42 42 0 -1 4194560 100 0 0 0 12 34 0 0 20 0 1 0 5 0 0")
                .expect("parses");
        assert_eq!(s.comm, "a) b (c)");
        assert_eq!(s.ppid, 7);
        assert_eq!(s.cpu_ticks, 46);
    }
}
