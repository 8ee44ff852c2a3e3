use super::*;

const MS: Duration = Duration::from_millis(1);

fn lc(policy: RestartPolicy) -> Lifecycle {
    Lifecycle::new(
        policy,
        Backoff {
            initial: 100 * MS,
            max: 30_000 * MS,
        },
        StartLimit {
            burst: 5,
            interval: Duration::from_secs(60),
        },
    )
}

/// Drive a machine through events at given offsets; jitter 0 unless stated.
struct Clock(Instant);

impl Clock {
    fn at(&self, ms: u64) -> Instant {
        self.0 + Duration::from_millis(ms)
    }
}

fn clock() -> Clock {
    Clock(Instant::now())
}

#[test]
fn starts_only_when_gate_opens_and_becomes_running_when_ready() {
    let c = clock();
    let mut l = lc(RestartPolicy::OnFailure);
    assert_eq!(l.state(), State::Waiting);
    assert_eq!(l.health(), "none");
    assert_eq!(l.on(Event::Ready, c.at(0), 0.0), Action::None);
    assert_eq!(
        l.state(),
        State::Waiting,
        "health events before spawn are ignored"
    );
    assert_eq!(l.on(Event::Start, c.at(0), 0.0), Action::Spawn);
    assert_eq!(l.state(), State::Starting);
    assert_eq!(l.health(), "unready");
    assert!(!l.is_ready());
    l.on(Event::Ready, c.at(10), 0.0);
    assert_eq!(l.state(), State::Running);
    assert!(l.is_ready());
    l.on(Event::Unready, c.at(20), 0.0);
    assert_eq!(l.state(), State::Running);
    assert_eq!(l.health(), "unready");
    assert!(!l.is_ready());
}

#[test]
fn blocked_and_unblocked_by_dependencies() {
    let c = clock();
    let mut l = lc(RestartPolicy::OnFailure);
    l.on(Event::Block, c.at(0), 0.0);
    assert_eq!(l.state(), State::Blocked);
    assert!(!l.state().is_active());
    l.on(Event::Unblock, c.at(1), 0.0);
    assert_eq!(l.state(), State::Waiting);
    assert_eq!(l.on(Event::Start, c.at(2), 0.0), Action::Spawn);
}

#[test]
fn one_shot_job_completes_or_exits() {
    let c = clock();
    for policy in [RestartPolicy::Never, RestartPolicy::OnFailure] {
        let mut l = lc(policy);
        l.on(Event::Start, c.at(0), 0.0);
        assert_eq!(l.on(Event::Exited(0), c.at(5), 0.0), Action::None);
        assert_eq!(l.state(), State::Completed);
        assert!(l.is_ready(), "a completed job counts as ready");
        assert_eq!(l.exit_code(), Some(0));
    }
    let mut l = lc(RestartPolicy::Never);
    l.on(Event::Start, c.at(0), 0.0);
    l.on(Event::Exited(3), c.at(5), 0.0);
    assert_eq!(l.state(), State::Exited);
    assert_eq!(l.exit_code(), Some(3));
    assert!(!l.is_ready());
}

#[test]
fn always_restarts_even_after_success() {
    let c = clock();
    let mut l = lc(RestartPolicy::Always);
    l.on(Event::Start, c.at(0), 0.0);
    assert_eq!(
        l.on(Event::Exited(0), c.at(5), 0.0),
        Action::Schedule(100 * MS)
    );
    assert_eq!(l.state(), State::Backoff);
    assert_eq!(l.on(Event::Timer, c.at(105), 0.0), Action::Spawn);
    assert_eq!(l.restarts(), 1);
}

#[test]
fn backoff_doubles_up_to_max_with_jitter_bounds() {
    let b = Backoff {
        initial: 100 * MS,
        max: 1000 * MS,
    };
    assert_eq!(backoff_delay(b, 0, 0.0), 100 * MS);
    assert_eq!(backoff_delay(b, 1, 0.0), 200 * MS);
    assert_eq!(backoff_delay(b, 3, 0.0), 800 * MS);
    assert_eq!(backoff_delay(b, 4, 0.0), 1000 * MS);
    assert_eq!(backoff_delay(b, 40, 0.0), 1000 * MS);
    assert_eq!(backoff_delay(b, 0, 1.0), 120 * MS);
    assert_eq!(backoff_delay(b, 0, -1.0), 80 * MS);
    assert_eq!(backoff_delay(b, 0, 7.0), 120 * MS, "jitter is clamped");
}

#[test]
fn crash_loop_hits_start_limit_then_retries_every_max() {
    let c = clock();
    let mut l = lc(RestartPolicy::OnFailure);
    let mut t = 0;
    l.on(Event::Start, c.at(t), 0.0);
    let mut delays = Vec::new();
    // Starts 1..=5 are allowed within the interval; the 5th crash finds 5 starts.
    for _ in 0..4 {
        t += 10;
        match l.on(Event::Exited(1), c.at(t), 0.0) {
            Action::Schedule(d) => delays.push(d),
            other => panic!("expected a backoff, got {other:?}"),
        }
        assert_eq!(l.state(), State::Backoff);
        t += delays.last().map_or(0, |d| d.as_millis() as u64);
        assert_eq!(l.on(Event::Timer, c.at(t), 0.0), Action::Spawn);
    }
    assert_eq!(delays, vec![100 * MS, 200 * MS, 400 * MS, 800 * MS]);
    t += 10;
    assert_eq!(
        l.on(Event::Exited(1), c.at(t), 0.0),
        Action::Schedule(30_000 * MS)
    );
    assert_eq!(l.state(), State::Failed);
    assert!(!l.state().is_active());
    assert_eq!(l.restarts(), 4);
    // Retried once every backoff.max while it keeps failing.
    t += 30_000;
    assert_eq!(l.on(Event::Timer, c.at(t), 0.0), Action::Spawn);
    assert_eq!(l.state(), State::Starting);
    t += 10;
    assert_eq!(
        l.on(Event::Exited(1), c.at(t), 0.0),
        Action::Schedule(30_000 * MS)
    );
    assert_eq!(l.state(), State::Failed);
    // Once a retry stays up 60 s, failed is forgotten and backoff starts over.
    t += 30_000;
    l.on(Event::Timer, c.at(t), 0.0);
    t += 61_000;
    assert_eq!(
        l.on(Event::Exited(1), c.at(t), 0.0),
        Action::Schedule(100 * MS)
    );
    assert_eq!(l.state(), State::Backoff);
}

#[test]
fn start_limit_counts_only_starts_inside_the_interval() {
    let c = clock();
    let mut l = Lifecycle::new(
        RestartPolicy::Always,
        Backoff {
            initial: 100 * MS,
            max: 100 * MS,
        },
        StartLimit {
            burst: 2,
            interval: Duration::from_secs(1),
        },
    );
    l.on(Event::Start, c.at(0), 0.0);
    assert!(matches!(
        l.on(Event::Exited(1), c.at(10), 0.0),
        Action::Schedule(_)
    ));
    l.on(Event::Timer, c.at(110), 0.0); // second start at 110 ms
    // Third start would be within 1 s of the first: blocked.
    l.on(Event::Exited(1), c.at(120), 0.0);
    assert_eq!(l.state(), State::Failed);

    let mut l = Lifecycle::new(
        RestartPolicy::Always,
        Backoff {
            initial: 100 * MS,
            max: 100 * MS,
        },
        StartLimit {
            burst: 2,
            interval: Duration::from_secs(1),
        },
    );
    l.on(Event::Start, c.at(0), 0.0);
    l.on(Event::Exited(1), c.at(10), 0.0);
    l.on(Event::Timer, c.at(110), 0.0);
    // The first start has left the window by now.
    l.on(Event::Exited(1), c.at(1_050), 0.0);
    assert_eq!(l.state(), State::Backoff);
}

#[test]
fn backoff_resets_after_a_stable_run() {
    let c = clock();
    let mut l = lc(RestartPolicy::Always);
    l.on(Event::Start, c.at(0), 0.0);
    l.on(Event::Exited(1), c.at(10), 0.0);
    l.on(Event::Timer, c.at(110), 0.0);
    assert_eq!(
        l.on(Event::Exited(1), c.at(120), 0.0),
        Action::Schedule(200 * MS)
    );
    l.on(Event::Timer, c.at(320), 0.0);
    assert_eq!(
        l.on(Event::Exited(1), c.at(320 + 60_000), 0.0),
        Action::Schedule(100 * MS)
    );
}

#[test]
fn stop_signals_then_stays_stopped() {
    let c = clock();
    let mut l = lc(RestartPolicy::Always);
    l.on(Event::Start, c.at(0), 0.0);
    l.on(Event::Ready, c.at(1), 0.0);
    assert_eq!(l.on(Event::Stop, c.at(2), 0.0), Action::Stop);
    assert_eq!(l.state(), State::Stopping);
    assert_eq!(l.on(Event::Stop, c.at(3), 0.0), Action::None, "idempotent");
    assert_eq!(l.on(Event::Exited(143), c.at(4), 0.0), Action::None);
    assert_eq!(l.state(), State::Stopped);
    assert_eq!(l.health(), "none");
    assert_eq!(l.on(Event::Timer, c.at(5), 0.0), Action::None);
    assert_eq!(l.state(), State::Stopped);
}

#[test]
fn stop_in_backoff_or_waiting_needs_no_signal() {
    let c = clock();
    let mut l = lc(RestartPolicy::Always);
    assert_eq!(l.on(Event::Stop, c.at(0), 0.0), Action::None);
    assert_eq!(l.state(), State::Stopped);
    let mut l = lc(RestartPolicy::Always);
    l.on(Event::Start, c.at(0), 0.0);
    l.on(Event::Exited(1), c.at(1), 0.0);
    assert_eq!(l.on(Event::Stop, c.at(2), 0.0), Action::None);
    assert_eq!(l.state(), State::Stopped);
    assert_eq!(
        l.on(Event::Timer, c.at(200), 0.0),
        Action::None,
        "stale timer"
    );
}

#[test]
fn restart_replaces_the_process_and_clears_failed() {
    let c = clock();
    let mut l = Lifecycle::new(
        RestartPolicy::Always,
        Backoff {
            initial: 100 * MS,
            max: 100 * MS,
        },
        StartLimit {
            burst: 1,
            interval: Duration::from_secs(60),
        },
    );
    l.on(Event::Start, c.at(0), 0.0);
    l.on(Event::Exited(1), c.at(1), 0.0);
    assert_eq!(l.state(), State::Failed);
    assert_eq!(l.on(Event::Restart, c.at(2), 0.0), Action::Spawn);
    assert_eq!(l.state(), State::Starting);
    assert_eq!(l.on(Event::Restart, c.at(3), 0.0), Action::Stop);
    assert_eq!(l.state(), State::Stopping);
    assert_eq!(l.on(Event::Exited(143), c.at(4), 0.0), Action::Spawn);
    assert_eq!(l.state(), State::Starting);
    assert_eq!(l.restarts(), 2);
}

#[test]
fn unhealthy_restart_goes_through_backoff() {
    let c = clock();
    let mut l = lc(RestartPolicy::Never);
    l.on(Event::Start, c.at(0), 0.0);
    l.on(Event::Ready, c.at(1), 0.0);
    assert_eq!(l.on(Event::Unhealthy, c.at(2), 0.0), Action::Stop);
    assert_eq!(
        l.on(Event::Exited(143), c.at(3), 0.0),
        Action::Schedule(100 * MS)
    );
    assert_eq!(l.state(), State::Backoff);
}

#[test]
fn spawn_error_is_a_failure_exit() {
    let c = clock();
    let mut l = lc(RestartPolicy::OnFailure);
    l.on(Event::Start, c.at(0), 0.0);
    assert!(matches!(
        l.on(Event::Exited(127), c.at(0), 0.0),
        Action::Schedule(_)
    ));
    assert_eq!(l.exit_code(), Some(127));
}

#[test]
fn a_replacement_keeps_the_replica_ready_and_clears_its_failures() {
    let mut l = lc(RestartPolicy::OnFailure);
    let t0 = Instant::now();
    assert_eq!(l.on(Event::Start, t0, 0.0), Action::Spawn);
    assert_eq!(l.on(Event::Ready, t0, 0.0), Action::None);
    let t1 = t0 + Duration::from_secs(5);
    assert_eq!(l.on(Event::Replaced, t1, 0.0), Action::None);
    assert_eq!(l.state(), State::Running);
    assert!(l.is_ready());
    assert_eq!(l.restarts(), 1);
    assert_eq!(l.started_at(), Some(t1));
    // Not applicable without a process.
    l.on(Event::Stop, t1, 0.0);
    l.on(Event::Exited(0), t1, 0.0);
    assert_eq!(l.on(Event::Replaced, t1, 0.0), Action::None);
    assert_eq!(l.state(), State::Stopped);
}
