//! Restart policies, backoff, start limits, liveness (SPEC §3 Restarts, One-shot jobs).

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;

const T: Duration = Duration::from_secs(20);

/// Start times in milliseconds, as written by `date +%s%N` lines.
fn start_times(p: &Project) -> Vec<u64> {
    p.lines("starts.log")
        .iter()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .map(|ns| ns / 1_000_000)
        .collect()
}

#[test]
fn backoff_doubles_and_the_start_limit_fails_the_replica() {
    let p = Project::new(
        r#"
[services.crashy]
command = ["sh", "-c", "date +%s%N >> starts.log; exit 1"]
port = "none"
backoff = { initial = "100ms", max = "2s" }
start_limit = { burst = 4, interval = "60s" }
"#,
    );
    let mut mesh = p.up(&[]);
    // Only a failed replica is left: mesh up exits 1 (SPEC §3 One-shot jobs).
    assert_eq!(mesh.exit_code(T), 1);
    mesh.wait_line("crashy.0 failed: started 4 times within 1m", T);
    let times = start_times(&p);
    assert_eq!(times.len(), 4, "exactly burst starts: {times:?}");
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    // 100, 200, 400 ms with ±20 % jitter (and some start-up time on top).
    for (gap, base) in gaps.iter().zip([100u64, 200, 400]) {
        assert!(
            *gap >= base * 8 / 10,
            "gap {gap} ms below {base} ms -20 %: {gaps:?}"
        );
        assert!(
            *gap < base * 12 / 10 + 1000,
            "gap {gap} ms far above {base} ms: {gaps:?}"
        );
    }
    assert_eq!(mesh.count("crashy.0 restarting in"), 3);
}

#[test]
fn restart_policies() {
    let p = Project::new(
        r#"
[services.always]
command = ["sh", "-c", "echo run >> always.log; exit 0"]
port = "none"
restart = "always"
backoff = { initial = "10ms", max = "10ms" }
start_limit = { burst = 3, interval = "60s" }

[services.never]
command = ["sh", "-c", "echo run >> never.log; exit 5"]
port = "none"
restart = "never"

[services.onfail]
command = ["sh", "-c", "echo run >> onfail.log; exit 0"]
port = "none"
"#,
    );
    let mut mesh = p.up(&[]);
    assert_eq!(mesh.exit_code(T), 1, "never exited 5 and always failed");
    assert_eq!(
        p.lines("always.log").len(),
        3,
        "always restarts even after exit 0"
    );
    assert_eq!(p.lines("never.log").len(), 1);
    assert_eq!(
        p.lines("onfail.log").len(),
        1,
        "on-failure does not restart exit 0"
    );
    mesh.wait_line("never.0 exited with code 5", T);
}

#[test]
fn unhealthy_replica_is_restarted_when_asked() {
    let p = Project::new(
        r#"
[services.sick]
command = ["sh", "-c", "date +%s%N >> starts.log; exec sleep 1000"]
port = "none"
backoff = { initial = "10ms", max = "10ms" }
[services.sick.health]
exec = ["sh", "-c", "test ! -f sick"]
interval = "100ms"
failures = 2
restart_on_unhealthy = true
"#,
    );
    let mut mesh = p.up(&[]);
    eventually("first start", T, || {
        (start_times(&p).len() == 1).then_some(())
    });
    p.write("sick", "");
    mesh.wait_line("sick.0 is unready", T);
    eventually("a restart", T, || {
        (start_times(&p).len() >= 2).then_some(())
    });
    std::fs::remove_file(p.file("sick")).expect("rm sick");
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}
