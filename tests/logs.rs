//! `mesh logs` (SPEC §4): past lines from the files in `state_dir/logs/`, merged in time
//! order with `mesh up`'s prefixes, `-n`, services, `--log-format json`, rotated files,
//! with and without a running mesh, and `-f` following until SIGINT.

mod support;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;
use support::*;

const T: Duration = Duration::from_secs(20);

/// `mesh [GLOBAL…] logs --file mesh.toml ARGS…` (`-f` is `--follow` for `logs`).
fn logs_cmd(p: &Project, global: &[&str], args: &[&str]) -> Command {
    let mut cmd = Command::new(mesh_bin());
    cmd.args(global)
        .arg("logs")
        .arg("--file")
        .arg(p.file("mesh.toml"))
        .args(args)
        .env("MESH_STATE_DIR", ".mesh")
        .current_dir(p.path());
    cmd
}

/// Run `mesh logs ARGS` to the end: (exit code, stdout lines, stderr).
fn logs(p: &Project, global: &[&str], args: &[&str]) -> (i32, Vec<String>, String) {
    let out = logs_cmd(p, global, args).output().expect("run mesh logs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Make a FIFO an app reads its go-ahead from.
fn fifo(p: &Project, name: &str) {
    nix::unistd::mkfifo(
        &p.file(name),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .expect("mkfifo");
}

/// Tell an app blocked on `read x < NAME` to go on, once it is there reading.
fn go(p: &Project, name: &str) {
    // Opening a FIFO without a reader fails at once with O_NONBLOCK instead of waiting.
    let mut fifo = eventually(&format!("an app to read {name}"), T, || {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(p.file(name))
            .ok()
    });
    fifo.write_all(b"go\n").expect("write fifo");
}

/// Wait until `line` is in a replica's log file, then until the clock has passed its
/// stamp, so that any line written next is stamped later (stamps have milliseconds).
fn logged(p: &Project, file: &str, line: &str) {
    let path = format!(".mesh/logs/{file}");
    let stamp = eventually(&format!("{line:?} in {path}"), T, || {
        p.lines(&path)
            .iter()
            .find(|l| l.ends_with(&format!(" {line}")))
            .and_then(|l| l.split(' ').next().map(str::to_string))
    });
    let stamp = humantime::parse_rfc3339(&stamp).expect("stamp");
    eventually("the clock to pass the stamp", T, || {
        (SystemTime::now() > stamp + Duration::from_millis(1)).then_some(())
    });
}

/// Two jobs whose lines interleave: a1, b1, a2 (each after the one before it is logged).
fn interleaved() -> Project {
    let p = Project::new(
        r#"
[services.a]
command = ["sh", "-c", "echo $$$$ > a.pid; echo a1; read x < a.go; echo a2"]
port = "none"
restart = "never"

[services.b]
command = ["sh", "-c", "echo $$$$ > b.pid; read x < b.go; echo b1 >&2"]
port = "none"
restart = "never"
"#,
    );
    fifo(&p, "a.go");
    fifo(&p, "b.go");
    p
}

#[test]
fn past_lines_of_services_merge_in_time_order_after_the_mesh_is_gone() {
    let p = interleaved();
    let mut mesh = p.up(&[]);
    logged(&p, "a.0.log", "a1");
    go(&p, "b.go");
    logged(&p, "b.0.log", "b1");
    go(&p, "a.go");
    assert_eq!(mesh.exit_code(T), 0, "the jobs completed");
    let pids = [
        read_pid(&p, "a.pid", T),
        read_pid(&p, "b.pid", T),
        mesh.pid(),
    ];
    assert_gone(&pids, T);

    // No mesh runs: the files are read all the same.
    let (code, out, err) = logs(&p, &[], &[]);
    assert_eq!((code, err.as_str()), (0, ""));
    assert_eq!(out, ["a.0 | a1", "b.0 | b1", "a.0 | a2"]);

    // The last line of each service; a service's last two; one service.
    let (code, out, _) = logs(&p, &[], &["-n", "1"]);
    assert_eq!(code, 0);
    assert_eq!(out, ["b.0 | b1", "a.0 | a2"]);
    let (_, out, _) = logs(&p, &[], &["--tail", "2", "a"]);
    assert_eq!(out, ["a.0 | a1", "a.0 | a2"]);
    let (_, out, _) = logs(&p, &[], &["b"]);
    assert_eq!(out, ["b.0 | b1"]);
    let (_, out, _) = logs(&p, &[], &["-n", "0"]);
    assert!(out.is_empty(), "{out:?}");

    // JSON, with the stored time and stream.
    let (code, out, _) = logs(&p, &["--log-format", "json"], &["b"]);
    assert_eq!(code, 0);
    assert_eq!(out.len(), 1, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out[0]).expect("a json line");
    let stored = p.read(".mesh/logs/b.0.log");
    let ts = stored.split(' ').next().expect("a stamp");
    assert_eq!(
        v,
        serde_json::json!({
            "ts": ts,
            "service": "b",
            "replica": 0,
            "stream": "stderr",
            "line": "b1",
        })
    );
}

#[test]
fn rotated_files_come_first_oldest_first() {
    let p = Project::new(
        r#"
[services.job]
command = ["true"]
port = "none"
"#,
    );
    // Rotation happens at 10 MiB: files as it leaves them, written here.
    let dir = p.file(".mesh/logs");
    std::fs::create_dir_all(&dir).expect("logs dir");
    let stamp = |i: u32| format!("2024-01-02T03:04:{i:02}.000Z stdout line{i}\n");
    for (name, lines) in [
        ("job.0.log.3", 0..2),
        ("job.0.log.2", 2..4),
        ("job.0.log.1", 4..6),
        ("job.0.log", 6..7),
    ] {
        std::fs::write(dir.join(name), lines.map(stamp).collect::<String>()).expect("write");
    }
    let (code, out, err) = logs(&p, &[], &[]);
    assert_eq!((code, err.as_str()), (0, ""));
    let want: Vec<String> = (0..7).map(|i| format!("job.0 | line{i}")).collect();
    assert_eq!(out, want);
    let (_, out, _) = logs(&p, &[], &["-n", "3", "job"]);
    assert_eq!(out, ["job.0 | line4", "job.0 | line5", "job.0 | line6"]);
}

#[test]
fn an_unknown_service_or_a_broken_config_is_an_error() {
    let p = Project::new(
        r#"
[services.job]
command = ["true"]
port = "none"
"#,
    );
    let (code, out, err) = logs(&p, &[], &["job", "nope"]);
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{out:?}");
    let path = p.file("mesh.toml");
    assert_eq!(
        err.trim_end(),
        format!("mesh: no service `nope` in {}", path.display())
    );

    p.write(
        "mesh.toml",
        "version = 1\n[services.job]\ncomand = [\"true\"]\n",
    );
    let (code, _, err) = logs(&p, &[], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("comand"), "{err}");
}

#[test]
fn follow_prints_new_lines_until_sigint() {
    let p = Project::new(
        r#"
[services.app]
command = ["sh", "-c", "echo $$$$ > app.pid; echo first; read x < go; echo second-$$x; exec sleep 1000"]
port = "none"
"#,
    );
    fifo(&p, "go");
    let mut mesh = p.up(&[]);
    mesh.wait_line("app.0 | first", T);
    let app = read_pid(&p, "app.pid", T);

    let mut follow = MeshProc::spawn(logs_cmd(&p, &[], &["-f"]));
    follow.wait_line("app.0 | first", T);
    // Written after `mesh logs -f` printed the past.
    go(&p, "go");
    follow.wait_line("app.0 | second-go", T);

    follow.signal(Signal::SIGINT);
    assert_eq!(follow.exit_code(T), 0);
    // Quietly: nothing but the two lines, once each.
    assert_eq!(follow.output(), ["app.0 | first", "app.0 | second-go"]);

    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
    assert_gone(&[app, mesh.pid(), follow.pid()], T);
}

/// A child killed when the test ends early.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn follow_and_past_lines_cross_a_real_rotation() {
    // 110 000 lines of about 100 bytes stored: past 10 MiB, one rotation.
    let p = Project::new(
        r#"
[services.flood]
command = ["sh", "-c", "echo ready; read x < go; seq 1 110000 | sed 's/$$/ xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx/'; echo done; exec sleep 1000"]
port = "none"
"#,
    );
    fifo(&p, "go");
    let mut mesh = p.up(&[]);
    mesh.wait_line("flood.0 | ready", T);

    // Output to a file: a quarter of a million lines is no work for `wait_line`.
    let out = std::fs::File::create(p.file("follow.out")).expect("create");
    let err = std::fs::File::create(p.file("follow.err")).expect("create");
    let mut follow = Guard(
        logs_cmd(&p, &[], &["-f"])
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn mesh logs -f"),
    );
    eventually("mesh logs -f to print the past", T, || {
        p.read("follow.out")
            .contains("flood.0 | ready")
            .then_some(())
    });
    go(&p, "go");
    eventually("mesh logs -f to print the last line", T, || {
        p.read("follow.out")
            .contains("flood.0 | done")
            .then_some(())
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(follow.0.id() as i32),
        Signal::SIGINT,
    )
    .expect("kill");
    let status = eventually("mesh logs -f to exit", T, || {
        follow.0.try_wait().expect("try_wait")
    });
    assert_eq!(status.code(), Some(0));
    assert_eq!(p.read("follow.err"), "");
    assert!(
        p.file(".mesh/logs/flood.0.log.1").exists(),
        "the file was rotated"
    );

    // Every line once, in order, followed live and read back from both files.
    let numbers = |lines: &[String]| -> Vec<u32> {
        lines
            .iter()
            .filter_map(|l| {
                l.strip_prefix("flood.0 | ")?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    let want: Vec<u32> = (1..=110_000).collect();
    let followed = p.lines("follow.out");
    assert_eq!(numbers(&followed), want);
    assert_eq!(followed.last().map(String::as_str), Some("flood.0 | done"));
    let (code, past, _) = logs(&p, &[], &[]);
    assert_eq!(code, 0);
    assert_eq!(numbers(&past), want);
    assert_eq!(past.first().map(String::as_str), Some("flood.0 | ready"));

    let app = pids_of(&mesh, "sleep", "flood", 0);
    assert!(!app.is_empty());
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
    let mut gone = app;
    gone.extend([mesh.pid(), follow.0.id() as i32]);
    assert_gone(&gone, T);
}
