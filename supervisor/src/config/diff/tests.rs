//! The reload plan, one case per rule of SPEC §4 "Reload": configurations are written as
//! `mesh.toml` text and loaded as `mesh reload` loads them, with no processes involved.
#![allow(clippy::unwrap_used, reason = "a failing test panics")]

use std::path::Path;

use super::*;
use crate::config::tests::{parse_ok, parse_ok_in};

/// What one changed key should produce, for the service `api` of [`file`].
#[derive(Debug)]
enum Want {
    Replace(&'static [&'static str]),
    Live(&'static [&'static str]),
    Scale(u32, u32),
    Mesh(&'static [&'static str]),
    RestartMesh(&'static str),
    RestartService(&'static str),
    /// Written differently, same meaning: an empty plan.
    Nothing,
}

/// One row: `key` is the rule it exercises; `mesh` and `api` are the `[mesh]` and
/// `[services.api]` bodies of the running file and of the new one.
struct Case {
    key: &'static str,
    mesh: [&'static str; 2],
    api: [&'static str; 2],
    want: Want,
}

const fn svc(key: &'static str, old: &'static str, new: &'static str, want: Want) -> Case {
    Case {
        key,
        mesh: ["", ""],
        api: [old, new],
        want,
    }
}

const fn mesh(key: &'static str, old: &'static str, new: &'static str, want: Want) -> Case {
    Case {
        key,
        mesh: [old, new],
        api: ["", ""],
        want,
    }
}

// One row per line, so the table reads like SPEC §4.
#[rustfmt::skip]
const CASES: &[Case] = &[
    // `[mesh]`: refused with "restart required".
    mesh("name", r#"name = "shop""#, r#"name = "store""#, Want::RestartMesh("name")),
    mesh("state_dir", r#"state_dir = ".mesh""#, r#"state_dir = "run""#, Want::RestartMesh("state_dir")),
    mesh("admin", r#"admin = "127.0.0.1:9901""#, r#"admin = "off""#, Want::RestartMesh("admin")),
    mesh("tls", "", r#"tls = "off""#, Want::RestartMesh("tls")),
    mesh("local_path", "", r#"local_path = "tls""#, Want::RestartMesh("local_path")),
    mesh("access_log", "", r#"access_log = "stdout""#, Want::RestartMesh("access_log")),
    mesh(
        "ca",
        r#"ca = { cert = "ca.crt", key = "ca.key" }"#,
        r#"ca = { cert = "other.crt", key = "ca.key" }"#,
        Want::RestartMesh("ca"),
    ),
    mesh("listen", "", r#"listen = "10.0.0.5""#, Want::RestartMesh("listen")),
    mesh("etcd", "", r#"etcd = { endpoints = ["http://10.0.0.9:2379"] }"#, Want::RestartMesh("etcd")),
    mesh(
        "etcd",
        r#"etcd = { endpoints = ["http://10.0.0.9:2379"] }"#,
        r#"etcd = { endpoints = ["http://10.0.0.9:2379"], lease_ttl = "5s" }"#,
        Want::RestartMesh("etcd"),
    ),
    mesh("etcd", r#"etcd = { endpoints = ["http://e"] }"#, r#"etcd = { endpoints = ["http://e"], lease_ttl = "10s" }"#, Want::Nothing),
    // `[mesh]`: applied live.
    mesh("shutdown_timeout", "", r#"shutdown_timeout = "1m""#, Want::Mesh(&["shutdown_timeout"])),
    mesh("seed", "seed = 1", "seed = 2", Want::Mesh(&["seed"])),
    mesh("shutdown_timeout", "", r#"shutdown_timeout = "30s""#, Want::Nothing),
    // A service: its replicas are replaced one at a time.
    svc("command", "", r#"command = "api --v2""#, Want::Replace(&["command"])),
    svc("working_dir", r#"working_dir = "a""#, r#"working_dir = "b""#, Want::Replace(&["working_dir"])),
    svc("env", r#"env = { A = "1" }"#, r#"env = { A = "2" }"#, Want::Replace(&["env"])),
    svc("env", r#"env = { A = "1" }"#, r#"env = { A = "1", B = "2" }"#, Want::Replace(&["env"])),
    // The path changed, the contents are the same (both files hold `X=1`).
    svc("env_file", r#"env_file = "one.env""#, r#"env_file = "two.env""#, Want::Replace(&["env_file"])),
    svc("env_file", "", r#"env_file = "one.env""#, Want::Replace(&["env_file"])),
    svc("user", "", r#"user = "www-data""#, Want::Replace(&["user"])),
    svc("group", r#"group = "a""#, r#"group = "b""#, Want::Replace(&["group"])),
    svc("port", "port = 0", "port = 8081", Want::Replace(&["port"])),
    svc("port", "port = 0", r#"port = "none""#, Want::Replace(&["port"])),
    svc("upstreams", "", r#"upstreams = ["db"]"#, Want::Replace(&["upstreams"])),
    // A service: applied without restarting its processes.
    svc("expose", "expose = 8080", "expose = 8081", Want::Live(&["expose"])),
    svc("depends_on", "", r#"depends_on = ["db"]"#, Want::Live(&["depends_on"])),
    svc("depends_on", r#"depends_on = ["db"]"#, r#"depends_on = { db = "healthy" }"#, Want::Live(&["depends_on"])),
    svc("restart", "", r#"restart = "always""#, Want::Live(&["restart"])),
    svc("backoff", "", r#"backoff = { initial = "1s" }"#, Want::Live(&["backoff"])),
    svc("start_limit", "", "start_limit = { burst = 3 }", Want::Live(&["start_limit"])),
    svc("stop_signal", "", r#"stop_signal = "SIGINT""#, Want::Live(&["stop_signal"])),
    svc("stop_timeout", "", r#"stop_timeout = "5s""#, Want::Live(&["stop_timeout"])),
    svc("ready_timeout", "", r#"ready_timeout = "2m""#, Want::Live(&["ready_timeout"])),
    svc("watch", "", r#"watch = ["**/*.py"]"#, Want::Live(&["watch"])),
    svc("watch", r#"watch = ["*.py"]"#, r#"watch = ["*.py", "!tests/"]"#, Want::Live(&["watch"])),
    svc("allow", "", r#"allow = ["db"]"#, Want::Live(&["allow"])),
    svc("health", "", "health = { tcp = true }", Want::Live(&["health"])),
    svc("health", "health = { tcp = true }", r#"health = { tcp = true, interval = "5s" }"#, Want::Live(&["health"])),
    svc("traffic", "", r#"traffic = { timeout = "1s" }"#, Want::Live(&["traffic"])),
    svc("routes", "", r#"routes = [{ path_prefix = "/v2", backends = { db = 1 } }]"#, Want::Live(&["routes"])),
    // A service: only the highest indices start or stop.
    svc("replicas", "replicas = 2", "replicas = 3", Want::Scale(2, 3)),
    svc("replicas", "replicas = 3", "replicas = 1", Want::Scale(3, 1)),
    // A service: refused with "restart required" (the kind of its sidecars changes).
    svc("protocol", "", r#"protocol = "grpc""#, Want::RestartService("protocol")),
    // Defaults written out are no change.
    svc("replicas", "", "replicas = 1", Want::Nothing),
    svc("ready_timeout", "", r#"ready_timeout = "60s""#, Want::Nothing),
    svc("stop_signal", r#"stop_signal = "TERM""#, r#"stop_signal = "SIGTERM""#, Want::Nothing),
];

/// A `mesh.toml` with a service `db` and the service `api` under test. `api` gets
/// `command = "api"` unless its body sets a command.
fn file(mesh: &str, api: &str) -> String {
    let command = if api.contains("command") {
        ""
    } else {
        "command = \"api\"\n"
    };
    format!(
        "version = 1\n\n[mesh]\n{mesh}\n\n[services.db]\ncommand = \"db\"\n\n[services.api]\n{command}{api}\n"
    )
}

fn expected(want: &Want) -> Result<Plan, Refusal> {
    let keys = |keys: &[&'static str]| keys.to_vec();
    let plan = match want {
        Want::Replace(k) => Plan {
            replace: vec![Replacement {
                service: "api".into(),
                keys: keys(k),
                replicas: 1,
            }],
            ..Plan::default()
        },
        Want::Live(k) => Plan {
            live: vec![ServiceChange {
                service: "api".into(),
                keys: keys(k),
            }],
            ..Plan::default()
        },
        Want::Scale(from, to) => Plan {
            scale: vec![Scale {
                service: "api".into(),
                from: *from,
                to: *to,
            }],
            ..Plan::default()
        },
        Want::Mesh(k) => Plan {
            mesh: keys(k),
            ..Plan::default()
        },
        Want::RestartMesh(key) => {
            return Err(Refusal::RestartRequired {
                keys: vec![RestartKey::Mesh(key)],
            });
        }
        Want::RestartService(key) => {
            return Err(Refusal::RestartRequired {
                keys: vec![RestartKey::Service {
                    service: "api".into(),
                    key,
                }],
            });
        }
        Want::Nothing => Plan::default(),
    };
    Ok(plan)
}

/// A directory holding the env files the cases name, with the same contents.
fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("one.env"), "X=1\n").unwrap();
    std::fs::write(dir.path().join("two.env"), "X=1\n").unwrap();
    dir
}

fn load(dir: &Path, mesh: &str, api: &str) -> Config {
    parse_ok_in(dir, &file(mesh, api))
}

#[test]
fn each_rule_of_reload() {
    let dir = project();
    let mut failures = Vec::new();
    for case in CASES {
        let old = load(dir.path(), case.mesh[0], case.api[0]);
        let new = load(dir.path(), case.mesh[1], case.api[1]);
        let got = diff(&old, &new);
        let want = expected(&case.want);
        if got != want {
            failures.push(format!(
                "{}: {:?} -> {:?}\n  want {want:?}\n  got  {got:?}",
                case.key, case.api, case.mesh
            ));
        }
        // The other way round is the same kind of change.
        let back = diff(&new, &old);
        if back.is_ok() != want.is_ok() {
            failures.push(format!("{} (reversed): got {back:?}", case.key));
        }
    }
    assert!(
        failures.is_empty(),
        "{} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every rule is exercised by a row of [`CASES`].
#[test]
fn every_rule_has_a_case() {
    let covered: Vec<&str> = CASES
        .iter()
        .filter(|c| !matches!(c.want, Want::Nothing))
        .map(|c| c.key)
        .collect();
    let rules = MESH_RULES
        .iter()
        .map(|r| r.key)
        .chain(SERVICE_RULES.iter().map(|r| r.key));
    let missing: Vec<&str> = rules.filter(|k| !covered.contains(k)).collect();
    assert!(missing.is_empty(), "rules without a case: {missing:?}");
}

#[test]
fn the_same_file_is_an_empty_plan() {
    let text = file(r#"name = "shop""#, r#"env = { A = "1" }"#);
    let plan = diff(&parse_ok(&text), &parse_ok(&text)).unwrap();
    assert!(plan.is_empty());
    assert_eq!(plan, Plan::default());
    assert!(plan.lines().is_empty());
    assert_eq!(plan.to_string(), "no changes");
}

#[test]
fn a_file_written_differently_is_an_empty_plan() {
    let old = r#"
version = 1

[services.api]
command = ["api", "--port", "${PORT}"]
health = { http = "/healthz", interval = "2s" }
traffic = { timeout = "1s" }
"#;
    let new = r#"
version = 1

# The API.
[services.api]
traffic.timeout = "1000ms"
command = "api --port ${PORT}"

[services.api.health]
interval = "2s"
http = "/healthz"
"#;
    assert_eq!(diff(&parse_ok(old), &parse_ok(new)), Ok(Plan::default()));
}

#[test]
fn env_file_contents_changed_under_the_same_path() {
    let dir = project();
    let text = file("", r#"env_file = "one.env""#);
    let old = parse_ok_in(dir.path(), &text);
    std::fs::write(dir.path().join("one.env"), "X=2\n").unwrap();
    let new = parse_ok_in(dir.path(), &text);
    assert_eq!(diff(&old, &new), expected(&Want::Replace(&["env_file"])));

    // Quoting changes what the file sets: single quotes are not interpolated.
    std::fs::write(dir.path().join("one.env"), "X='2'\n").unwrap();
    let quoted = parse_ok_in(dir.path(), &text);
    assert_eq!(diff(&new, &quoted), expected(&Want::Replace(&["env_file"])));
}

#[test]
fn env_file_comments_and_layout_are_no_change() {
    let dir = project();
    let text = file("", r#"env_file = "one.env""#);
    let old = parse_ok_in(dir.path(), &text);
    std::fs::write(
        dir.path().join("one.env"),
        "# the answer\n\nexport X=1  # one\n",
    )
    .unwrap();
    let new = parse_ok_in(dir.path(), &text);
    assert_eq!(diff(&old, &new), Ok(Plan::default()));
}

#[test]
fn added_services_start_in_order_and_removed_ones_stop_dependents_first() {
    let old = parse_ok(
        r#"
version = 1
[services.db]
command = "db"
[services.api]
command = "api"
depends_on = ["db"]
[services.keep]
command = "keep"
"#,
    );
    let new = parse_ok(
        r#"
version = 1
[services.keep]
command = "keep"
[services.worker]
command = "worker"
depends_on = ["queue"]
[services.queue]
command = "queue"
"#,
    );
    let plan = diff(&old, &new).unwrap();
    assert_eq!(
        plan,
        Plan {
            added: vec!["queue".into(), "worker".into()],
            removed: vec!["api".into(), "db".into()],
            ..Plan::default()
        }
    );
    assert_eq!(
        plan.lines(),
        [
            "api: removed: stopping it",
            "db: removed: stopping it",
            "queue: added: starting it",
            "worker: added: starting it",
        ]
    );
}

#[test]
fn one_service_can_be_replaced_and_changed_live() {
    let dir = project();
    let old = load(dir.path(), "", r#"env = { A = "1" }"#);
    let new = load(
        dir.path(),
        "",
        r#"env = { A = "2" }
command = "api --v2"
traffic = { timeout = "1s" }
allow = ["db"]"#,
    );
    assert_eq!(
        diff(&old, &new),
        Ok(Plan {
            replace: vec![Replacement {
                service: "api".into(),
                keys: vec!["command", "env"],
                replicas: 1,
            }],
            live: vec![ServiceChange {
                service: "api".into(),
                keys: vec!["allow", "traffic"],
            }],
            ..Plan::default()
        })
    );
}

#[test]
fn scaling_with_a_replacement_replaces_only_the_replicas_that_remain() {
    let dir = project();
    let three = load(dir.path(), "", "replicas = 3\nenv = { A = \"1\" }");
    let one = load(dir.path(), "", "replicas = 1\nenv = { A = \"2\" }");

    let down = diff(&three, &one).unwrap();
    assert_eq!(down.replace[0].replicas, 1);
    assert_eq!(down.scale[0].stopping(), 1..3);
    assert!(down.scale[0].starting().is_empty());

    let up = diff(&one, &three).unwrap();
    assert_eq!(up.replace[0].replicas, 1);
    assert_eq!(up.scale[0].starting(), 1..3);
    assert!(up.scale[0].stopping().is_empty());
}

#[test]
fn a_refusal_lists_every_key_that_needs_a_restart_and_applies_nothing() {
    let dir = project();
    let old = load(dir.path(), r#"name = "shop""#, "");
    let new = load(
        dir.path(),
        "name = \"store\"\ntls = \"off\"\nshutdown_timeout = \"1m\"",
        "protocol = \"grpc\"\nenv = { A = \"1\" }",
    );
    let refusal = diff(&old, &new).unwrap_err();
    assert_eq!(
        refusal,
        Refusal::RestartRequired {
            keys: vec![
                RestartKey::Mesh("name"),
                RestartKey::Mesh("tls"),
                RestartKey::Service {
                    service: "api".into(),
                    key: "protocol"
                },
            ]
        }
    );
    assert_eq!(
        refusal.to_string(),
        "restart required: `[mesh] name`, `[mesh] tls` and `protocol` of service `api` changed \
         (a service's protocol decides the kind of its sidecars)"
    );
    let one = diff(&old, &load(dir.path(), r#"name = "store""#, "")).unwrap_err();
    assert_eq!(one.to_string(), "restart required: `[mesh] name` changed");
}

#[test]
fn lines_say_what_happens() {
    let old = parse_ok(
        r#"
version = 1
[services.api]
command = "api"
replicas = 2
[services.web]
command = "web"
[services.old]
command = "old"
"#,
    );
    let new = parse_ok(
        r#"
version = 1
[mesh]
shutdown_timeout = "1m"
seed = 7
[services.api]
command = "api"
replicas = 2
env = { A = "1" }
traffic = { timeout = "1s" }
routes = [{ path_prefix = "/v2", backends = { web = 1 } }]
[services.web]
command = "web --v2"
replicas = 3
[services.new]
command = "new"
"#,
    );
    let plan = diff(&old, &new).unwrap();
    assert!(!plan.is_empty());
    assert_eq!(
        plan.lines(),
        [
            "[mesh] shutdown_timeout, seed changed: applied",
            "old: removed: stopping it",
            "new: added: starting it",
            "web: command changed: replacing its replica",
            "api: env changed: replacing 2 replicas one at a time",
            "web: replicas 1 -> 3: starting web.1, web.2",
            "api: traffic, routes changed: applied without restarting its processes",
        ]
    );
    assert_eq!(plan.to_string(), plan.lines().join("\n"));

    let down = diff(&new, &old).unwrap();
    assert!(
        down.lines()
            .contains(&"web: replicas 3 -> 1: stopping web.1, web.2".to_owned())
    );
}

#[test]
fn a_service_moving_between_this_host_and_the_others_is_scaled_not_replaced() {
    let mesh = "[mesh]\nlisten = \"10.0.0.1\"\netcd = { endpoints = [\"http://10.0.0.9:2379\"] }\n";
    let here = parse_ok(&format!(
        "version = 1\n{mesh}[services.api]\ncommand = \"api\"\nenv = {{ A = \"1\" }}\n"
    ));
    let elsewhere = parse_ok(&format!("version = 1\n{mesh}[services.api]\n"));
    let away = diff(&here, &elsewhere).unwrap();
    assert_eq!(away.replace, []);
    assert_eq!(
        away.scale,
        [Scale {
            service: "api".into(),
            from: 1,
            to: 0
        }]
    );
    assert_eq!(
        away.lines(),
        ["api: now runs on other hosts only: stopping api.0"]
    );
    let back = diff(&elsewhere, &here).unwrap();
    assert_eq!(back.replace, []);
    assert_eq!(back.lines(), ["api: now runs here too: starting api.0"]);
}
