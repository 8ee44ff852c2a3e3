//! systemd notifications (SPEC §6), when `mesh up` runs under a unit with
//! `Type=notify` (`NOTIFY_SOCKET` is set): `READY=1` once every replica is ready (or
//! completed), `STATUS=` with a one-line summary whenever it changes, `WATCHDOG=1` at half
//! of `WATCHDOG_USEC`, and `STOPPING=1` when the mesh starts stopping.
//!
//! The datagrams are sent by the `sd-notify` crate, which reads `NOTIFY_SOCKET` itself;
//! whether to talk to systemd at all, and the watchdog interval, are decided from the
//! environment map `cli` read once.

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_supervisor::lifecycle::State;
use mesh_supervisor::supervisor::Statuses;
use sd_notify::NotifyState;
use tokio::sync::watch;

/// What the unit asked for, from mesh's environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Systemd {
    /// `WATCHDOG_USEC`, when set for this process (`WATCHDOG_PID` absent or ours).
    pub(crate) watchdog: Option<Duration>,
}

impl Systemd {
    /// `Some` when `NOTIFY_SOCKET` is set.
    pub(crate) fn from_env(env: &BTreeMap<String, String>) -> Option<Systemd> {
        env.get("NOTIFY_SOCKET").filter(|s| !s.is_empty())?;
        let pid_matches = env
            .get("WATCHDOG_PID")
            .is_none_or(|pid| pid.trim() == std::process::id().to_string());
        let watchdog = env
            .get("WATCHDOG_USEC")
            .and_then(|usec| usec.trim().parse::<u64>().ok())
            .filter(|usec| *usec > 0 && pid_matches)
            .map(Duration::from_micros);
        Some(Systemd { watchdog })
    }
}

/// Send `states`; a failure is logged (systemd may be gone, mesh keeps running).
pub(crate) fn send(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify systemd");
    }
}

/// Keep systemd informed until the task is dropped. `warning` is appended to `STATUS=`
/// (the mesh CA expiring soon, SPEC §8).
pub(crate) async fn serve(
    systemd: Systemd,
    mut status: watch::Receiver<Statuses>,
    warning: Option<String>,
) {
    let mut ready_sent = false;
    let mut last = String::new();
    let mut watchdog = systemd.watchdog.map(|usec| {
        let mut tick = tokio::time::interval(usec / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    let mut open = true;
    loop {
        let (line, all_ready) = summary(&status.borrow_and_update(), warning.as_deref());
        if line != last {
            send(&[NotifyState::Status(&line)]);
            last = line;
        }
        if all_ready && !ready_sent {
            send(&[NotifyState::Ready]);
            ready_sent = true;
        }
        tokio::select! {
            changed = status.changed(), if open => open = changed.is_ok(),
            _ = async {
                match watchdog.as_mut() {
                    Some(tick) => { tick.tick().await; }
                    None => std::future::pending::<()>().await,
                }
            } => send(&[NotifyState::Watchdog]),
        }
    }
}

/// `3/4 ready, 1 restarting` (and the warning), and whether every replica is ready.
fn summary(statuses: &Statuses, warning: Option<&str>) -> (String, bool) {
    let total = statuses.len();
    let ready = statuses.values().filter(|r| r.ready).count();
    let restarting = statuses
        .values()
        .filter(|r| matches!(r.state, State::Backoff | State::Failed))
        .count();
    let mut line = format!("{ready}/{total} ready, {restarting} restarting");
    if let Some(warning) = warning {
        line.push_str("; warning: ");
        line.push_str(warning);
    }
    (line, ready == total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_ours_only_when_its_pid_is_ours_or_unset() {
        let env = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(Systemd::from_env(&env(&[])), None);
        let ours = std::process::id().to_string();
        let with = Systemd::from_env(&env(&[
            ("NOTIFY_SOCKET", "/run/x"),
            ("WATCHDOG_USEC", "4000000"),
            ("WATCHDOG_PID", &ours),
        ]))
        .expect("notify");
        assert_eq!(with.watchdog, Some(Duration::from_secs(4)));
        let other = Systemd::from_env(&env(&[
            ("NOTIFY_SOCKET", "/run/x"),
            ("WATCHDOG_USEC", "4000000"),
            ("WATCHDOG_PID", "1"),
        ]))
        .expect("notify");
        assert_eq!(other.watchdog, None);
    }
}
