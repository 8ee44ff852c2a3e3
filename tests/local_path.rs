//! The local path (SPEC §1): with the default `local_path = "in-process"` a call between
//! two sidecars of one mesh crosses no socket (the inbound's listener accepts nothing),
//! with `local_path = "tls"` it goes through the inbound's TLS listener. Either way the
//! app sees the same request. (Every data-path suite runs both ways: `.ci/run` runs them
//! again with `MESH_TEST_LOCAL_PATH=tls`.)

mod support;

use std::time::Duration;

use support::*;

const T: Duration = Duration::from_secs(30);

fn project(local_path: &str) -> Project {
    Project::new(&format!(
        r#"
[mesh]
name = "t"
shutdown_timeout = "10s"
{local_path}

[services.api]
command = [{app:?}]
expose = "127.0.0.1:0"

[services.caller]
command = ["sh", "-c", "echo url=$API_URL; exec sleep 1000"]
port = "none"
upstreams = ["api"]
"#,
        app = test_app()
    ))
}

/// The sum of `mesh_connections_total` for the inbound listeners of `api`.
fn inbound_connections(admin: &str) -> u64 {
    let metrics = get(admin, "/metrics").expect("metrics");
    metrics
        .body
        .lines()
        .filter(|l| {
            l.starts_with("mesh_connections_total{")
                && l.contains(r#"listener="inbound""#)
                && l.contains(r#"service="api""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Ten calls through the caller's outbound and ten through the ingress, each answered by
/// the app with the caller's identity.
fn calls_pass(mesh: &MeshProc) {
    let out = outbound(mesh, "caller");
    let ingress = ingress(mesh, "api");
    eventually("api to answer", T, || {
        (get(&out, "/whoami").ok()?.status == 200).then_some(())
    });
    for (entry, identity) in [
        (&out, "spiffe://t/caller"),
        (&ingress, "spiffe://t/ingress"),
    ] {
        for _ in 0..10 {
            let r = get(entry, "/headers").expect("request");
            assert_eq!(r.status, 200, "{}", r.body);
            assert!(
                r.body
                    .contains(&format!(r#""x-mesh-client-id":"{identity}""#)),
                "{}",
                r.body
            );
        }
    }
}

#[test]
fn local_calls_cross_no_socket_by_default() {
    let p = project("");
    let mesh = p.up(&[]);
    let admin = admin(&mesh);
    calls_pass(&mesh);
    assert_eq!(
        inbound_connections(&admin),
        0,
        "the inbound's listener accepted a connection for a local call"
    );
    let pids = app_pids(&mesh, "api", 1);
    stop_mesh(mesh, &pids);
}

#[test]
fn local_path_tls_goes_through_the_inbound_listener() {
    let p = project(r#"local_path = "tls""#);
    let mesh = p.up(&[]);
    let admin = admin(&mesh);
    calls_pass(&mesh);
    assert!(inbound_connections(&admin) > 0);
    let pids = app_pids(&mesh, "api", 1);
    stop_mesh(mesh, &pids);
}

#[test]
fn mesh_check_shows_the_local_path() {
    for (value, shown) in [("", "in-process"), (r#"local_path = "tls""#, "tls")] {
        let p = project(value);
        let (code, out, err) = p.check();
        assert_eq!(code, 0, "{err}");
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with("local_path"))
            .unwrap_or_else(|| panic!("no local_path line in:\n{out}"));
        assert!(line.contains(shown), "{line}");
    }
}
