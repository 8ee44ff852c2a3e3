//! `mesh up -d` and `mesh up --wait` (SPEC §4): a mesh in the background, and waiting
//! until it is ready.
//!
//! # Theory of operation
//!
//! `mesh up -d` starts the current binary again (`std::env::current_exe()`) as `mesh up
//! --detached -f FILE [SERVICE…]`, with the same environment, working directory and
//! `--log-format`, stdin from `/dev/null`, and stdout and stderr appended to
//! `state_dir/mesh.out`. That child is an ordinary foreground `mesh up` in every other
//! way: it takes the state directory's lock, binds, starts the services, writes their
//! lines to `state_dir/logs/`, and stops on `mesh down` or SIGTERM.
//!
//! The hidden `--detached` makes the child start a session of its own first
//! ([`enter_session`]: `setsid(2)`, which is safe to call from the child itself, so no
//! `pre_exec` and no `unsafe`): it then has no controlling terminal, so closing the
//! terminal sends it no SIGHUP (which would reload it) and Ctrl-C in that terminal does
//! not reach it or its applications. It is spawned without a process group of its own
//! precisely so that it is not a group leader, which `setsid` requires; it is in the
//! terminal's foreground group only for the instant before that call. Once it holds the
//! lock it empties `mesh.out` ([`start_output`]), so the file holds what the mesh now
//! running printed (mesh's own lines and the applications' lines, as a foreground `mesh
//! up` shows them), and a second `mesh up -d` refused with `already running` does not
//! erase the running one's output: its refusal is appended instead. The file is not
//! rotated; the applications' lines are also in `state_dir/logs/`, which is.
//!
//! The parent returns once the child's control socket answers `ps`, having checked that
//! `state_dir/mesh.pid` names the child (so an older mesh answering on the socket is
//! never taken for it). If the child exits first (an invalid file, `already running`, a
//! port in use, …), the parent prints the last lines of `mesh.out` and exits with the
//! child's code. The socket has no way to push changes, so the parent polls it, with a
//! short growing pause between tries.
//!
//! `--wait` goes on polling `ps` until every replica started is ready (health `ready`,
//! or `completed`), and fails at once when one is `failed`, `exited` or `blocked`,
//! printing its last lines from `state_dir/logs/`. `--wait-timeout` (default
//! [`DEFAULT_WAIT_TIMEOUT`]) bounds the whole wait, start-up included. On failure the
//! mesh keeps running, as docker compose leaves its containers: `mesh ps` and `mesh logs`
//! show why, `mesh down` stops it.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mesh_supervisor::config::Config;
use mesh_supervisor::logs;

use super::Format;
use crate::control;

/// Where a detached mesh's stdout and stderr go, inside `state_dir`.
pub(super) const OUTPUT: &str = "mesh.out";

/// How long `--wait` waits without `--wait-timeout` (docker compose waits forever by
/// default; a bound makes a script fail instead of hanging). Plain `-d` waits as long
/// for the mesh to answer on its control socket.
pub(super) const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(60);

/// How many lines of a log are printed when something went wrong.
const TAIL: usize = 20;

/// How much of the end of `mesh.out` is read for its last lines.
const TAIL_BYTES: u64 = 64 * 1024;

/// How long one `ps` may take to be answered while polling: the socket is bound a
/// little before the mesh serves it.
const PS_LIMIT: Duration = Duration::from_secs(2);

/// What the parent waits for.
#[derive(Clone, Copy, Debug)]
pub(super) enum Until {
    /// The mesh answers on its control socket (`-d`).
    Running,
    /// Every replica started is ready (`--wait`).
    Ready,
}

/// Run `mesh up -d` / `mesh up --wait` on a loaded configuration: start the mesh in the
/// background and return as `until` says, within `limit`.
pub(super) fn up(
    config: &Config,
    services: &[String],
    format: Format,
    until: Until,
    limit: Duration,
) -> ExitCode {
    let state_dir = &config.mesh.state_dir;
    let output = state_dir.join(OUTPUT);
    let started = Instant::now();
    let since = SystemTime::now();
    let deadline = started + limit;
    let (mut child, offset) = match spawn(config, services, format, &output) {
        Ok(spawned) => spawned,
        Err(e) => {
            eprintln!("mesh: cannot start the mesh in the background: {e:#}");
            return ExitCode::from(1);
        }
    };
    let mut pause = Pause::new();
    let mut rows = loop {
        if let Some(code) = ended(&mut child, state_dir, offset) {
            return code;
        }
        if names_child(state_dir, child.id()) {
            if let Ok(rows) = ps(state_dir) {
                break rows;
            }
        }
        if Instant::now() >= deadline {
            eprintln!(
                "mesh: the mesh (pid {}) did not answer on {} within {}; its output is in {}",
                child.id(),
                control::socket_path(state_dir).display(),
                humantime::format_duration(limit),
                output.display()
            );
            return ExitCode::from(1);
        }
        pause.wait();
    };
    if let Until::Running = until {
        println!(
            "mesh | running in the background (pid {}), output in {}; `mesh down` stops it",
            child.id(),
            output.display()
        );
        return ExitCode::SUCCESS;
    }
    let logs_dir = state_dir.join("logs");
    loop {
        match progress(&rows) {
            Progress::Ready(ready) => {
                // The mesh's own ready line (time, exposed URLs, dashboard), as `mesh up`
                // prints it; it follows the status by a moment.
                let said = Instant::now() + Duration::from_secs(2);
                let mut pause = Pause::new();
                let line = loop {
                    let asked =
                        control::call_within(state_dir, "urls", serde_json::Value::Null, PS_LIMIT);
                    if let Some(line) = asked
                        .ok()
                        .and_then(|d| d["ready_line"].as_str().map(str::to_string))
                    {
                        break format!("mesh | {line}");
                    }
                    if Instant::now() >= said {
                        break ready_line(&ready, started.elapsed());
                    }
                    pause.wait();
                };
                println!("{line}");
                return ExitCode::SUCCESS;
            }
            Progress::Failed(failed) => {
                for replica in &failed {
                    eprintln!(
                        "mesh: `{}` {} before it was ready",
                        replica.label(),
                        replica.describe()
                    );
                    print_tail(&logs_dir, replica, since);
                }
                eprintln!("{}", still_running(child.id()));
                return ExitCode::from(1);
            }
            Progress::Waiting(pending) => {
                if Instant::now() >= deadline {
                    eprintln!(
                        "mesh: not ready within {}: {}",
                        humantime::format_duration(limit),
                        pending
                            .iter()
                            .map(|r| format!("`{}` ({}, {})", r.label(), r.state, r.health))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    for replica in &pending {
                        print_tail(&logs_dir, replica, since);
                    }
                    eprintln!("{}", still_running(child.id()));
                    return ExitCode::from(1);
                }
            }
        }
        pause.wait();
        if let Some(code) = ended(&mut child, state_dir, offset) {
            return code;
        }
        // A `ps` that fails (the mesh is stopping) is followed by the child's exit.
        if let Ok(next) = ps(state_dir) {
            rows = next;
        }
    }
}

/// In the detached child, first of all: a session of its own, away from the terminal.
pub(super) fn enter_session() {
    // Fails only for a process group leader (someone ran `mesh up --detached` by hand
    // from a shell); the mesh then stays in the shell's session, as a foreground one.
    if let Err(e) = nix::unistd::setsid() {
        tracing::debug!(error = %e, "setsid failed; staying in the current session");
    }
}

/// In the detached child, once it holds the state directory's lock: start the output
/// file afresh (it is open for appending, so the next line goes to its start).
pub(super) fn start_output(state_dir: &Path) {
    if let Ok(file) = OpenOptions::new().write(true).open(state_dir.join(OUTPUT)) {
        let _ = file.set_len(0);
    }
}

/// The line printed once every replica started is ready.
pub(super) fn ready_line(ready: &Ready, _elapsed: Duration) -> String {
    // Issue 19 gives this line its final form (time, exposed URLs, dashboard).
    format!(
        "mesh | ready: {} {}, {} {}",
        ready.services,
        plural(ready.services, "service", "services"),
        ready.replicas,
        plural(ready.replicas, "replica", "replicas")
    )
}

/// What `--wait` saw of the mesh when it was ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Ready {
    pub(super) services: usize,
    pub(super) replicas: usize,
}

// === helpers ===

/// Start `mesh up --detached` with its output appended to `output`; with the length the
/// file had before.
fn spawn(
    config: &Config,
    services: &[String],
    format: Format,
    output: &Path,
) -> anyhow::Result<(Child, u64)> {
    use anyhow::Context as _;
    let state_dir = &config.mesh.state_dir;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("cannot create state_dir {}", state_dir.display()))?;
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(output)
        .with_context(|| format!("cannot open {}", output.display()))?;
    let offset = file
        .metadata()
        .with_context(|| format!("cannot open {}", output.display()))?
        .len();
    let err = file
        .try_clone()
        .with_context(|| format!("cannot open {}", output.display()))?;
    let exe = std::env::current_exe().context("cannot find the mesh binary")?;
    let format = match format {
        Format::Text => "text",
        Format::Json => "json",
    };
    Command::new(&exe)
        .args(["--log-format", format, "up", "--detached", "-f"])
        .arg(&config.path)
        .arg("--")
        .args(services)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map(|child| (child, offset))
        .with_context(|| format!("cannot run {}", exe.display()))
}

/// If the child has exited: print the end of its output and give the exit code.
/// `offset` is where its output began in the file, unless it took the state directory
/// (and so emptied the file).
fn ended(child: &mut Child, state_dir: &Path, offset: u64) -> Option<ExitCode> {
    let status = match child.try_wait() {
        Ok(Some(status)) => status,
        Ok(None) => return None,
        Err(e) => {
            eprintln!("mesh: cannot watch the mesh in the background: {e}");
            return Some(ExitCode::from(1));
        }
    };
    let output = state_dir.join(OUTPUT);
    let ran = names_child(state_dir, child.id());
    let lines = tail_of(&output, if ran { 0 } else { offset }).unwrap_or_default();
    let code = super::exec::exit_code(status);
    if code == 0 {
        // Every service was a job and all of them completed (or someone ran `mesh
        // down` already).
        for line in &lines {
            println!("{line}");
        }
        println!("mesh | the mesh ran to its end (exit code 0)");
    } else {
        for line in &lines {
            eprintln!("{line}");
        }
        if ran {
            eprintln!(
                "mesh: the mesh stopped with exit code {code}; its output is in {}",
                output.display()
            );
        }
    }
    Some(ExitCode::from(code))
}

/// The last lines of the detached mesh's output file, from byte `from` on.
fn tail_of(path: &Path, from: u64) -> io::Result<Vec<String>> {
    let mut file = File::open(path)?;
    let end = file.seek(SeekFrom::End(0))?;
    // The file may have been emptied since `from` was taken.
    let from = if from > end { 0 } else { from };
    // Enough for the last lines; a long output is not read whole.
    let start = from.max(end.saturating_sub(TAIL_BYTES));
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > from && !lines.is_empty() {
        // Cut mid-line.
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(TAIL);
    Ok(lines[skip..].iter().map(|l| l.to_string()).collect())
}

/// Whether `state_dir/mesh.pid` names `pid`: the mesh answering on the socket is then
/// the one just started.
fn names_child(state_dir: &Path, pid: u32) -> bool {
    fs::read_to_string(state_dir.join("mesh.pid"))
        .is_ok_and(|text| text.trim().parse::<u32>() == Ok(pid))
}

fn ps(state_dir: &Path) -> Result<serde_json::Value, control::ClientError> {
    control::call_within(state_dir, "ps", serde_json::Value::Null, PS_LIMIT)
}

/// One row of `ps`, as far as `--wait` looks at it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Replica {
    service: String,
    replica: u32,
    state: String,
    health: String,
    exit_code: Option<i64>,
}

impl Replica {
    fn from_row(row: &serde_json::Value) -> Option<Replica> {
        Some(Replica {
            service: row["service"].as_str()?.to_string(),
            replica: u32::try_from(row["replica"].as_u64()?).ok()?,
            state: row["state"].as_str()?.to_string(),
            health: row["health"].as_str().unwrap_or("none").to_string(),
            exit_code: row["exit_code"].as_i64(),
        })
    }

    fn label(&self) -> String {
        format!("{}.{}", self.service, self.replica)
    }

    fn is_ready(&self) -> bool {
        self.health == "ready" || self.state == "completed"
    }

    /// States it does not leave on its own: waiting on it would wait for the timeout.
    fn has_failed(&self) -> bool {
        matches!(self.state.as_str(), "failed" | "exited" | "blocked")
    }

    fn describe(&self) -> String {
        match (self.state.as_str(), self.exit_code) {
            ("blocked", _) => "is blocked (a dependency failed)".to_string(),
            ("failed", Some(code)) => {
                format!("failed (restarted too often; last exit code {code})")
            }
            ("failed", None) => "failed (restarted too often)".to_string(),
            (state, Some(code)) => format!("{state} with code {code}"),
            (state, None) => state.to_string(),
        }
    }
}

/// Where the replicas of one `ps` answer stand.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    Ready(Ready),
    /// The replicas that can no longer become ready.
    Failed(Vec<Replica>),
    /// The replicas not ready yet.
    Waiting(Vec<Replica>),
}

fn progress(rows: &serde_json::Value) -> Progress {
    let replicas: Vec<Replica> = rows
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Replica::from_row)
        .collect();
    let failed: Vec<Replica> = replicas
        .iter()
        .filter(|r| r.has_failed())
        .cloned()
        .collect();
    if !failed.is_empty() {
        return Progress::Failed(failed);
    }
    let pending: Vec<Replica> = replicas.iter().filter(|r| !r.is_ready()).cloned().collect();
    if !pending.is_empty() {
        return Progress::Waiting(pending);
    }
    let services: BTreeSet<&str> = replicas.iter().map(|r| r.service.as_str()).collect();
    Progress::Ready(Ready {
        services: services.len(),
        replicas: replicas.len(),
    })
}

/// Print the last lines a replica wrote since `since` (the files keep the lines of
/// earlier runs too), from its log files.
fn print_tail(logs_dir: &Path, replica: &Replica, since: SystemTime) {
    let file = logs::log_file(logs_dir, &replica.service, replica.replica);
    match logs::read_tail_raw(logs_dir, &replica.service, replica.replica, TAIL) {
        Ok(raw) => {
            let lines = lines_since(&raw, since);
            if lines.is_empty() {
                eprintln!("mesh: `{}` wrote nothing", replica.label());
                return;
            }
            eprintln!(
                "mesh: the last lines of `{}` ({}):",
                replica.label(),
                file.display()
            );
            for line in lines {
                eprintln!("{} | {line}", replica.label());
            }
        }
        Err(e) => eprintln!("mesh: cannot read {}: {e}", file.display()),
    }
}

/// The text of the stored lines (`<ts> <stream> <line>`) written at `since` or later.
/// Stored times have milliseconds, so `since` is taken to its millisecond.
fn lines_since(raw: &[String], since: SystemTime) -> Vec<String> {
    let since = since
        .duration_since(UNIX_EPOCH)
        .map(|d| UNIX_EPOCH + Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(0)))
        .unwrap_or(UNIX_EPOCH);
    raw.iter()
        .filter_map(|l| logs::parse_file_line(l))
        .filter(|record| humantime::parse_rfc3339(&record.ts).is_ok_and(|ts| ts >= since))
        .map(|record| record.line)
        .collect()
}

fn still_running(pid: u32) -> String {
    format!(
        "mesh: the mesh keeps running in the background (pid {pid}): `mesh ps` and `mesh logs` \
         show it, `mesh down` stops it"
    )
}

fn plural(n: usize, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 { one } else { many }
}

/// A pause between polls that grows from 10 ms to 200 ms: a mesh that is up in a few
/// milliseconds is seen at once, one that takes seconds is not asked 100 times a second.
struct Pause(Duration);

impl Pause {
    fn new() -> Pause {
        Pause(Duration::from_millis(10))
    }

    fn wait(&mut self) {
        std::thread::sleep(self.0);
        self.0 = (self.0 * 2).min(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(service: &str, replica: u32, state: &str, health: &str) -> serde_json::Value {
        json!({ "service": service, "replica": replica, "state": state, "health": health,
                "exit_code": null })
    }

    #[test]
    fn ready_when_every_replica_is_ready_or_completed() {
        let rows = json!([
            row("api", 0, "running", "ready"),
            row("api", 1, "running", "ready"),
            row("migrate", 0, "completed", "none"),
        ]);
        assert_eq!(
            progress(&rows),
            Progress::Ready(Ready {
                services: 2,
                replicas: 3
            })
        );
        let line = ready_line(
            &Ready {
                services: 1,
                replicas: 2,
            },
            Duration::ZERO,
        );
        assert_eq!(line, "mesh | ready: 1 service, 2 replicas");
    }

    #[test]
    fn waiting_names_the_replicas_not_ready() {
        let rows = json!([
            row("api", 0, "running", "ready"),
            row("api", 1, "running", "unready"),
            row("web", 0, "waiting", "none"),
            row("job", 0, "backoff", "none"),
        ]);
        let Progress::Waiting(pending) = progress(&rows) else {
            panic!("expected waiting");
        };
        let labels: Vec<String> = pending.iter().map(Replica::label).collect();
        assert_eq!(labels, ["api.1", "web.0", "job.0"]);
    }

    #[test]
    fn failed_exited_and_blocked_end_the_wait() {
        for state in ["failed", "exited", "blocked"] {
            let rows = json!([
                row("api", 0, "running", "ready"),
                row("job", 0, state, "none")
            ]);
            let Progress::Failed(failed) = progress(&rows) else {
                panic!("{state} should fail the wait");
            };
            assert_eq!(failed.len(), 1);
            assert_eq!(failed[0].label(), "job.0");
        }
        let exited = Replica::from_row(&json!({ "service": "job", "replica": 0,
            "state": "exited", "health": "none", "exit_code": 1 }))
        .expect("row");
        assert_eq!(exited.describe(), "exited with code 1");
    }

    #[test]
    fn only_the_lines_of_this_run_are_shown() {
        let raw = [
            "2024-05-01T10:00:00.000Z stdout from an earlier run".to_string(),
            "2024-05-01T10:00:05.250Z stderr this run".to_string(),
            "2024-05-01T10:00:06.000Z stdout and on".to_string(),
        ];
        let since = humantime::parse_rfc3339("2024-05-01T10:00:05.250Z").expect("time")
            + Duration::from_micros(400);
        assert_eq!(lines_since(&raw, since), ["this run", "and on"]);
    }
}
