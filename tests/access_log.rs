//! Access logs and traces (SPEC §5): `[mesh] access_log` writes one JSON line per request
//! with the trace id of its W3C `traceparent`, which the mesh creates at the ingress or
//! outbound when absent and otherwise propagates.

mod support;

use std::time::Duration;

use support::*;

const T: Duration = Duration::from_secs(30);

fn project(access_log: &str) -> Project {
    Project::new(&format!(
        r#"
[mesh]
name = "t"
shutdown_timeout = "10s"
access_log = "{access_log}"

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

/// The JSON lines of `text` whose `trace_id` is `trace`.
fn lines_of(text: &str, trace: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["trace_id"] == trace)
        .collect()
}

#[test]
fn each_request_is_one_json_line_with_its_trace_id() {
    let p = project("access.log");
    let mesh = p.up(&[]);
    let ingress = ingress(&mesh, "api");
    let out = outbound(&mesh, "caller");
    eventually("api to answer", T, || {
        (get(&ingress, "/whoami").ok()?.status == 200).then_some(())
    });

    // A trace id the caller chose is propagated to the app and logged.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = format!("00-{trace}-00f067aa0ba902b7-01");
    let r = http(&ingress, "GET", "/headers", &[("traceparent", &parent)], "").expect("request");
    assert_eq!(r.status, 200);
    assert!(r.body.contains(trace), "{}", r.body);
    let line = eventually("the access-log line of the request", T, || {
        lines_of(&p.read("access.log"), trace).pop()
    });
    assert_eq!(line["caller"], "ingress");
    assert_eq!(line["service"], "api");
    assert_eq!(line["replica"], "api.0");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/headers");
    assert_eq!(line["status"], 200);
    assert_eq!(line["attempts"], 1);
    assert!(line["error"].is_null(), "{line}");
    assert!(
        line["duration_ms"].as_f64().is_some_and(|d| d >= 0.0),
        "{line}"
    );
    assert!(
        line["ts"].as_str().is_some_and(|ts| ts.ends_with('Z')),
        "{line}"
    );

    // Without one, the outbound creates it: the app sees it, the log has its trace id.
    let r = get(&out, "/headers").expect("request");
    let seen: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    let created = seen["traceparent"]
        .as_str()
        .expect("a traceparent")
        .to_string();
    let trace = &created[3..35];
    let line = eventually("the access-log line of the created trace", T, || {
        lines_of(&p.read("access.log"), trace).pop()
    });
    assert_eq!(line["caller"], "caller");

    // A failure the mesh produced is logged with its kind.
    let missing = "00000000000000000000000000000abc";
    let parent = format!("00-{missing}-00f067aa0ba902b7-01");
    let r = http(&out, "GET", "/status/503", &[("traceparent", &parent)], "").expect("request");
    assert_eq!(r.status, 503);
    let line = eventually("the access-log line of the 503", T, || {
        lines_of(&p.read("access.log"), missing).pop()
    });
    assert_eq!(line["status"], 503);
    assert_eq!(line["attempts"], 3, "{line}");

    let pids = app_pids(&mesh, "api", 1);
    stop_mesh(mesh, &pids);
}

#[test]
fn access_log_on_stdout() {
    let p = project("stdout");
    let mesh = p.up(&[]);
    let ingress = ingress(&mesh, "api");
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let parent = format!("00-{trace}-b7ad6b7169203331-01");
    eventually("a logged request", T, || {
        let r = http(&ingress, "GET", "/whoami", &[("traceparent", &parent)], "").ok()?;
        (r.status == 200).then_some(())
    });
    mesh.wait_line(&format!(r#""trace_id":"{trace}""#), T);
    let pids = app_pids(&mesh, "api", 1);
    stop_mesh(mesh, &pids);
}

#[test]
fn a_tcp_connection_is_one_line() {
    let p = Project::new(&format!(
        r#"
[mesh]
name = "t"
shutdown_timeout = "10s"
access_log = "access.log"

[services.echo]
command = [{app:?}, "tcp"]
protocol = "tcp"

[services.caller]
command = ["sh", "-c", "echo addr=$ECHO_ADDR; exec sleep 1000"]
port = "none"
upstreams = ["echo"]
"#,
        app = test_app()
    ));
    let mesh = p.up(&[]);
    let line = mesh.wait_line("caller.0 | addr=", T);
    let addr = field_of(&line, "addr");
    let answer = eventually("an answer through the tcp outbound", T, || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).ok()?;
        s.write_all(b"hi").ok()?;
        s.shutdown(std::net::Shutdown::Write).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        (!out.is_empty()).then_some(out)
    });
    assert_eq!(answer, "echo.0:hi");
    let line = eventually("the access-log line of the connection", T, || {
        p.read("access.log")
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["method"] == "TCP" && v["status"] == 200)
    });
    assert_eq!(line["caller"], "caller");
    assert_eq!(line["service"], "echo");
    assert_eq!(line["replica"], "echo.0");
    assert_eq!(line["trace_id"].as_str().map(str::len), Some(32), "{line}");
    let pids = app_pids(&mesh, "echo", 1);
    stop_mesh(mesh, &pids);
}
