//! Health probes run through the real shim (SPEC §3 Readiness: `exec` checks).

use std::time::Duration;

use mesh_supervisor::health::{Probe, probe_once};
use mesh_supervisor::process::{SpawnSpec, set_shim};

#[tokio::test]
async fn exec_probe_passes_on_exit_zero_and_kills_on_timeout() {
    set_shim(env!("CARGO_BIN_EXE_mesh").into());
    // Bounded as a whole so that a broken spawn fails the test instead of hanging it.
    tokio::time::timeout(Duration::from_secs(30), check_exec_probe())
        .await
        .expect("probes finish");
}

async fn check_exec_probe() {
    let spec = |script: &str| {
        Probe::Exec(SpawnSpec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: std::env::temp_dir(),
            uid: None,
            gid: None,
        })
    };
    let timeout = Duration::from_secs(5);
    assert_eq!(probe_once(&spec("exit 0"), timeout).await, Ok(()));
    assert_eq!(
        probe_once(&spec("exit 3"), timeout).await,
        Err("exit code 3".into())
    );
    assert_eq!(
        probe_once(&spec("sleep 10"), Duration::from_millis(200)).await,
        Err("timed out after 200ms".into())
    );
}
