//! The life of one replica as a pure state machine.
//!
//! [`Lifecycle::on`] takes an [`Event`] and the current time, changes the state and says
//! what to do next as an [`Action`]. It performs no I/O and reads no clock, so every rule
//! of SPEC §3 (restarts, backoff, start limits, one-shot jobs) is unit-tested here without
//! processes. The replica task in `supervisor` carries the actions out.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Backoff, RestartPolicy, StartLimit};

/// How long a process must stay up for its backoff and `failed` state to reset.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);

/// What `mesh ps` shows as `state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// Not started yet: waiting for its `depends_on` conditions.
    Waiting,
    /// Not started: a dependency is `failed` or `exited`.
    Blocked,
    /// Spawned, not ready yet.
    Starting,
    /// Spawned and ready at least once.
    Running,
    /// Waiting out the delay before a restart.
    Backoff,
    /// Asked to stop; the process has not exited yet.
    Stopping,
    /// Stopped on request.
    Stopped,
    /// A one-shot job that exited 0 and will not be restarted.
    Completed,
    /// Exited non-zero and will not be restarted.
    Exited,
    /// A restart was blocked by `start_limit`; retried every `backoff.max`.
    Failed,
}

/// An input to the state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The `depends_on` conditions hold: start.
    Start,
    /// A dependency is `failed` or `exited`.
    Block,
    /// No dependency is `failed` or `exited` any more.
    Unblock,
    /// The readiness check passed.
    Ready,
    /// The readiness check failed `failures` times in a row.
    Unready,
    /// Unready, and `restart_on_unhealthy` is set: replace the process.
    Unhealthy,
    /// The process ended with this code (127 for a spawn error, 128+N for signal N).
    Exited(i32),
    /// The timer asked for by [`Action::Schedule`] fired.
    Timer,
    /// Stop and stay stopped (`mesh stop`, shutdown).
    Stop,
    /// Stop if running, then start again at once, clearing `failed` and the start
    /// history (`mesh restart`, a reload that changes the service, a watched file).
    Restart,
    /// A replacement process became ready and took over from the running one (a rolling
    /// replacement): the replica stays ready, its failures are cleared.
    Replaced,
}

/// What the replica task must do after a transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    /// Spawn the process now.
    Spawn,
    /// Send `stop_signal` to the process group, and SIGKILL after `stop_timeout`.
    Stop,
    /// Fire [`Event::Timer`] after this long (replaces any pending timer).
    Schedule(Duration),
}

/// The state machine of one replica, with the history its rules need.
#[derive(Clone, Debug)]
pub struct Lifecycle {
    policy: RestartPolicy,
    backoff: Backoff,
    start_limit: StartLimit,
    state: State,
    ready: bool,
    /// Spawn times inside the last `start_limit.interval`.
    starts: VecDeque<Instant>,
    /// When the current process was spawned.
    started_at: Option<Instant>,
    /// Consecutive quick restarts: the backoff exponent.
    attempt: u32,
    /// Set when `start_limit` blocked a restart; cleared after a stable run.
    crash_looping: bool,
    /// What to do once the process being stopped has exited.
    after_stop: AfterStop,
    restarts: u32,
    exit_code: Option<i32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterStop {
    Stay,
    /// Start again at once (an explicit restart).
    Respawn,
    /// Go through the restart rules as after a crash (unhealthy).
    AsCrash,
}

// === impl State ===

impl State {
    /// The lowercase name used by `mesh ps` and `/api/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Blocked => "blocked",
            State::Starting => "starting",
            State::Running => "running",
            State::Backoff => "backoff",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Completed => "completed",
            State::Exited => "exited",
            State::Failed => "failed",
        }
    }

    /// Whether a process exists in this state.
    pub fn has_process(self) -> bool {
        matches!(self, State::Starting | State::Running | State::Stopping)
    }

    /// Whether this replica may still change on its own: `mesh up` runs while any
    /// replica is in such a state.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            State::Waiting | State::Starting | State::Running | State::Backoff | State::Stopping
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Lifecycle ===

impl Lifecycle {
    pub fn new(policy: RestartPolicy, backoff: Backoff, start_limit: StartLimit) -> Self {
        Lifecycle {
            policy,
            backoff,
            start_limit,
            state: State::Waiting,
            ready: false,
            starts: VecDeque::new(),
            started_at: None,
            attempt: 0,
            crash_looping: false,
            after_stop: AfterStop::Stay,
            restarts: 0,
            exit_code: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Whether the replica counts as ready: its process is ready, or it completed.
    pub fn is_ready(&self) -> bool {
        (self.ready && self.state.has_process()) || self.state == State::Completed
    }

    /// `ready`, `unready` or `none` (no process), as `mesh ps` shows it.
    pub fn health(&self) -> &'static str {
        match (self.state.has_process(), self.ready) {
            (true, true) => "ready",
            (true, false) => "unready",
            (false, _) => "none",
        }
    }

    /// Whether the start limit has blocked a restart and no run has been stable since.
    pub fn is_crash_looping(&self) -> bool {
        self.crash_looping
    }

    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    pub fn exit_code(&self) -> Option<i32> {
        self.exit_code
    }

    /// When the current process was spawned, if one runs.
    pub fn started_at(&self) -> Option<Instant> {
        self.started_at.filter(|_| self.state.has_process())
    }

    /// Replace the restart settings (a reload that does not restart processes).
    pub fn set_policy(&mut self, policy: RestartPolicy, backoff: Backoff, limit: StartLimit) {
        self.policy = policy;
        self.backoff = backoff;
        self.start_limit = limit;
    }

    /// Apply `event` at time `now`. `jitter` is a sample from [-1, 1] used to spread
    /// backoff delays by ±20 %; passing it in keeps this function deterministic.
    pub fn on(&mut self, event: Event, now: Instant, jitter: f64) -> Action {
        use Event as E;
        use State::*;
        match (self.state, event) {
            (Waiting | Blocked, E::Start) => self.spawn(now),
            (Waiting, E::Block) => {
                self.state = Blocked;
                Action::None
            }
            (Blocked, E::Unblock) => {
                self.state = Waiting;
                Action::None
            }
            (Starting | Running, E::Ready) => {
                self.ready = true;
                self.state = Running;
                Action::None
            }
            (Starting | Running, E::Unready) => {
                self.ready = false;
                Action::None
            }
            (Starting | Running, E::Unhealthy) => {
                self.ready = false;
                self.after_stop = AfterStop::AsCrash;
                self.state = Stopping;
                Action::Stop
            }
            (Starting | Running, E::Exited(code)) => self.exited(code, now, jitter),
            (Stopping, E::Exited(code)) => {
                self.exit_code = Some(code);
                self.ready = false;
                match std::mem::replace(&mut self.after_stop, AfterStop::Stay) {
                    AfterStop::Stay => {
                        self.state = Stopped;
                        Action::None
                    }
                    AfterStop::Respawn => {
                        self.restarts += 1;
                        self.spawn(now)
                    }
                    AfterStop::AsCrash => self.restart_after_crash(now, jitter),
                }
            }
            (Backoff | Failed, E::Timer) => {
                self.restarts += 1;
                self.spawn(now)
            }
            (Starting | Running, E::Stop) => {
                // A stopping replica leaves discovery at once (SPEC §4 Signals).
                self.ready = false;
                self.after_stop = AfterStop::Stay;
                self.state = Stopping;
                Action::Stop
            }
            (Stopping, E::Stop) => {
                self.after_stop = AfterStop::Stay;
                Action::None
            }
            (Waiting | Blocked | Backoff | Failed, E::Stop) => {
                self.state = Stopped;
                Action::None
            }
            (Starting | Running, E::Restart) => {
                self.ready = false;
                self.clear_failures();
                self.after_stop = AfterStop::Respawn;
                self.state = Stopping;
                Action::Stop
            }
            (Stopping, E::Restart) => {
                self.clear_failures();
                self.after_stop = AfterStop::Respawn;
                Action::None
            }
            (Backoff | Failed | Stopped | Completed | Exited, E::Restart) => {
                self.clear_failures();
                if self.started_at.is_some() {
                    self.restarts += 1;
                }
                self.spawn(now)
            }
            (Waiting | Blocked, E::Restart) => Action::None,
            (Starting | Running, E::Replaced) => {
                self.clear_failures();
                self.ready = true;
                self.state = Running;
                self.started_at = Some(now);
                self.starts.push_back(now);
                self.restarts += 1;
                Action::None
            }
            // Everything else does not apply in that state (a late health event after the
            // process exited, a timer that lost a race with a stop, …).
            _ => Action::None,
        }
    }

    fn spawn(&mut self, now: Instant) -> Action {
        self.state = State::Starting;
        self.ready = false;
        self.started_at = Some(now);
        self.starts.push_back(now);
        Action::Spawn
    }

    fn clear_failures(&mut self) {
        self.crash_looping = false;
        self.attempt = 0;
        self.starts.clear();
    }

    fn exited(&mut self, code: i32, now: Instant, jitter: f64) -> Action {
        self.exit_code = Some(code);
        self.ready = false;
        let restart = match self.policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => code != 0,
            RestartPolicy::Never => false,
        };
        if !restart {
            self.state = if code == 0 {
                State::Completed
            } else {
                State::Exited
            };
            return Action::None;
        }
        self.restart_after_crash(now, jitter)
    }

    /// The restart rules: backoff that resets after a stable run, and the start limit.
    fn restart_after_crash(&mut self, now: Instant, jitter: f64) -> Action {
        let stable = self
            .started_at
            .is_some_and(|t| now.saturating_duration_since(t) >= STABLE_AFTER);
        if stable {
            self.attempt = 0;
            self.crash_looping = false;
        }
        while let Some(first) = self.starts.front() {
            if now.saturating_duration_since(*first) >= self.start_limit.interval {
                self.starts.pop_front();
            } else {
                break;
            }
        }
        if self.crash_looping || self.starts.len() >= self.start_limit.burst as usize {
            self.crash_looping = true;
            self.state = State::Failed;
            return Action::Schedule(self.backoff.max);
        }
        let delay = backoff_delay(self.backoff, self.attempt, jitter);
        self.attempt = self.attempt.saturating_add(1);
        self.state = State::Backoff;
        Action::Schedule(delay)
    }
}

/// `initial × 2^attempt`, capped at `max`, spread by ±20 % (`jitter` in [-1, 1]).
pub fn backoff_delay(backoff: Backoff, attempt: u32, jitter: f64) -> Duration {
    let factor = 2u32.saturating_pow(attempt.min(31));
    let base = backoff.initial.saturating_mul(factor).min(backoff.max);
    base.mul_f64(1.0 + 0.2 * jitter.clamp(-1.0, 1.0))
}

#[cfg(test)]
mod tests;
