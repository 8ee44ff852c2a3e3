//! Unit tests of the loader through its public API. The error messages themselves are
//! pinned by the corpus in the workspace's `tests/config_errors/`.
#![allow(clippy::unwrap_used, reason = "a failing test panics")]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::validate::{line_col, parse_duration};
use super::*;

mod routes;

fn no_env() -> BTreeMap<String, String> {
    BTreeMap::new()
}

fn env_of(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Parses `text` as `/srv/shop/mesh.toml` (the directory need not exist).
pub(super) fn parse_ok(text: &str) -> Config {
    match parse(text, Path::new("/srv/shop/mesh.toml"), &no_env()) {
        Ok(config) => config,
        Err(errors) => panic!("unexpected errors:\n{errors}"),
    }
}

/// Parses `text` as `mesh.toml` in `dir`, which holds the files it names (`env_file`s).
pub(super) fn parse_ok_in(dir: &Path, text: &str) -> Config {
    match parse(text, &dir.join("mesh.toml"), &no_env()) {
        Ok(config) => config,
        Err(errors) => panic!("unexpected errors:\n{errors}"),
    }
}

fn parse_err(text: &str) -> String {
    match parse(text, Path::new("/srv/shop/mesh.toml"), &no_env()) {
        Ok(_) => panic!("expected errors"),
        Err(errors) => errors.to_string().replace("/srv/shop/", ""),
    }
}

#[test]
fn minimal_file_gets_the_documented_defaults() {
    let config = parse_ok("version = 1\n[services.web]\ncommand = \"python3 web.py\"\n");
    assert_eq!(config.path, PathBuf::from("/srv/shop/mesh.toml"));
    assert_eq!(config.dir, PathBuf::from("/srv/shop"));
    assert_eq!(config.mesh.name, "shop");
    assert_eq!(config.mesh.state_dir, PathBuf::from("/srv/shop/.mesh"));
    assert_eq!(config.mesh.shutdown_timeout, Duration::from_secs(30));
    let web = &config.services["web"];
    assert_eq!(web.command, ["python3", "web.py"]);
    assert_eq!(web.working_dir, PathBuf::from("/srv/shop"));
    assert!(web.env.is_empty());
    assert_eq!(web.env_file, None);
    assert_eq!((web.user.as_deref(), web.group.as_deref()), (None, None));
    assert_eq!(web.replicas, 1);
    assert_eq!(web.protocol, Protocol::Http);
    assert_eq!(web.port, PortSpec::Assigned);
    assert!(web.upstreams.is_empty() && web.depends_on.is_empty());
    assert_eq!(web.restart, RestartPolicy::OnFailure);
    assert_eq!(
        web.backoff,
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30)
        }
    );
    assert_eq!(
        web.start_limit,
        StartLimit {
            burst: 5,
            interval: Duration::from_secs(60)
        }
    );
    assert_eq!(web.stop_signal, Signal::SIGTERM);
    assert_eq!(web.stop_timeout, Duration::from_secs(10));
    assert_eq!(web.health, None);
    assert_eq!(config.start_order, ["web"]);
}

#[test]
fn every_supported_key_is_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), "FROM_FILE=1\n").unwrap();
    let text = r#"
version = 1

[mesh]
name = "shop"
state_dir = "run/state"
shutdown_timeout = "1m30s"

[services.web]
command = ["python3", "web.py", "--port", "${PORT}"]
working_dir = "web"
env = { GREETING = "hello", DEBUG = 1 }
env_file = ".env"
user = "www-data"
group = "www-data"
replicas = 3
protocol = "grpc"
port = 0
upstreams = ["api"]
depends_on = { api = "healthy", migrate = "completed" }
restart = "always"
backoff = { initial = "1s", max = "1m" }
start_limit = { burst = 2, interval = "10s" }
stop_signal = "INT"
stop_timeout = "500ms"

[services.web.health]
http = "/healthz?port=${PORT}"
interval = "3s"
timeout = "2s"
failures = 4
start_period = "5s"
restart_on_unhealthy = true

[services.api]
command = "api --flag 'two words'"
port = 9000
health = { exec = ["check", "${MESH_SERVICE}"] }

[services.migrate]
command = "migrate"
port = "none"
restart = "never"
"#;
    let config = parse(text, &dir.path().join("mesh.toml"), &no_env()).unwrap();
    assert_eq!(config.mesh.state_dir, dir.path().join("run/state"));
    assert_eq!(config.mesh.shutdown_timeout, Duration::from_secs(90));
    let web = &config.services["web"];
    assert_eq!(web.command, ["python3", "web.py", "--port", "${PORT}"]);
    assert_eq!(web.working_dir, dir.path().join("web"));
    assert_eq!(
        web.env,
        [
            ("GREETING".to_owned(), "hello".to_owned()),
            ("DEBUG".to_owned(), "1".to_owned())
        ]
    );
    assert_eq!(web.env_file, Some(dir.path().join(".env")));
    assert_eq!(web.user.as_deref(), Some("www-data"));
    assert_eq!(web.replicas, 3);
    assert_eq!(web.protocol, Protocol::Grpc);
    assert_eq!(web.upstreams, ["api"]);
    assert_eq!(web.depends_on["api"], Condition::Healthy);
    assert_eq!(web.depends_on["migrate"], Condition::Completed);
    assert_eq!(web.restart, RestartPolicy::Always);
    assert_eq!(web.backoff.max, Duration::from_secs(60));
    assert_eq!(web.start_limit.burst, 2);
    assert_eq!(web.stop_signal, Signal::SIGINT);
    assert_eq!(web.stop_timeout, Duration::from_millis(500));
    let health = web.health.as_ref().unwrap();
    assert_eq!(
        health.check,
        HealthCheck::Http("/healthz?port=${PORT}".to_owned())
    );
    assert_eq!(
        (
            health.interval,
            health.timeout,
            health.failures,
            health.start_period
        ),
        (
            Duration::from_secs(3),
            Duration::from_secs(2),
            4,
            Duration::from_secs(5)
        )
    );
    assert!(health.restart_on_unhealthy);
    let api = &config.services["api"];
    assert_eq!(api.command, ["api", "--flag", "two words"]);
    assert_eq!(api.port, PortSpec::Fixed(9000));
    let api_health = api.health.as_ref().unwrap();
    assert_eq!(
        api_health.check,
        HealthCheck::Exec(vec!["check".into(), "${MESH_SERVICE}".into()])
    );
    assert_eq!(config.services["migrate"].port, PortSpec::None);
    assert_eq!(config.start_order, ["api", "migrate", "web"]);
}

#[test]
fn state_dir_defaults_follow_the_environment() {
    let text = "version = 1\n";
    let path = Path::new("/srv/shop/mesh.toml");
    let systemd = env_of(&[("STATE_DIRECTORY", "/var/lib/mesh:/var/lib/other")]);
    assert_eq!(
        parse(text, path, &systemd).unwrap().mesh.state_dir,
        PathBuf::from("/var/lib/mesh")
    );
    let both = env_of(&[
        ("STATE_DIRECTORY", "/var/lib/mesh"),
        ("MESH_STATE_DIR", "tmp/st"),
    ]);
    assert_eq!(
        parse(text, path, &both).unwrap().mesh.state_dir,
        PathBuf::from("/srv/shop/tmp/st")
    );
    // An explicit `state_dir` wins over both.
    let explicit = "version = 1\n[mesh]\nstate_dir = \"/x\"\n";
    assert_eq!(
        parse(explicit, path, &both).unwrap().mesh.state_dir,
        PathBuf::from("/x")
    );
}

#[test]
fn start_order_follows_depends_on_then_upstreams_without_cycles() {
    let config = parse_ok(
        r#"
version = 1
[services.web]
command = "w"
upstreams = ["api"]
[services.api]
command = "a"
upstreams = ["web", "cache"]
depends_on = ["db"]
[services.db]
command = "d"
[services.cache]
command = "c"
[services.zzz]
command = "z"
[services.aaa]
command = "a"
depends_on = ["zzz"]
"#,
    );
    // api <-> web are mutual upstreams: the first edge by name order (api's upstream web,
    // "web before api") is kept, the reverse one would close a cycle and is dropped.
    assert_eq!(
        config.start_order,
        ["cache", "db", "web", "api", "zzz", "aaa"]
    );
}

#[test]
fn errors_are_rendered_one_per_line_with_help() {
    let out = parse_err("version = 1\n[services.web]\ncomand = \"x\"\nreplicas = 0\n");
    assert_eq!(
        out,
        "mesh.toml:3:1: error: unknown key `comand` in `[services.web]`\n\
         help: did you mean `command`?\n\
         mesh.toml:4:12: error: `replicas` must be at least 1"
    );
}

#[test]
fn type_errors_in_several_places_are_all_reported() {
    let out = parse_err(
        "version = 1\n[services.a]\ncommand = 1\nreplicas = \"x\"\n[services.b]\ncommand = \"b\"\nhealth = { tcp = 1, interval = 5 }\n",
    );
    assert_eq!(
        out,
        "mesh.toml:3:11: error: wrong type for `services.a.command`: expected a string or an array of strings, found integer `1`\n\
         mesh.toml:4:12: error: wrong type for `services.a.replicas`: expected an integer, found string \"x\"\n\
         mesh.toml:7:18: error: wrong type for `services.b.health.tcp`: expected a boolean, found integer `1`\n\
         mesh.toml:7:32: error: wrong type for `services.b.health.interval`: expected a duration string such as \"10s\", found integer `5`"
    );
}

#[test]
fn unreadable_file_is_one_diagnostic_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.toml");
    let errors = load(&path, &no_env()).unwrap_err();
    assert_eq!(errors.0.len(), 1);
    let text = errors.to_string();
    assert!(
        text.starts_with(&format!(
            "{}: error: cannot read {}: ",
            path.display(),
            path.display()
        )),
        "{text}"
    );
}

#[test]
fn find_walks_up_to_the_nearest_mesh_toml() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b");
    std::fs::create_dir_all(&nested).unwrap();
    assert_eq!(find(&nested), None);
    std::fs::write(dir.path().join("mesh.toml"), "version = 1\n").unwrap();
    assert_eq!(find(&nested), Some(dir.path().join("mesh.toml")));
    std::fs::write(dir.path().join("a/mesh.toml"), "version = 1\n").unwrap();
    assert_eq!(find(&nested), Some(dir.path().join("a/mesh.toml")));
}

#[test]
fn app_env_layers_base_env_file_env_and_table() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("app.env"),
        "SHARED=file\nFROM_FILE=${HOME}/x\nLITERAL='${NOT_EXPANDED}'\n",
    )
    .unwrap();
    let text = r#"
version = 1
[mesh]
name = "shop"
[services.web]
command = "web --port ${PORT}"
env_file = "app.env"
env = { SHARED = "env", API = "${API_URL}", DB = "${DB_HOST:-localhost}" }
upstreams = ["api", "cache-v2"]
[services.api]
command = "api"
protocol = "grpc"
[services.cache-v2]
command = "cache"
protocol = "tcp"
"#;
    let config = parse(
        text,
        &dir.path().join("mesh.toml"),
        &env_of(&[("HOME", "/h")]),
    )
    .unwrap();
    let web = &config.services["web"];
    let addrs: BTreeMap<String, SocketAddr> = [
        ("api".to_owned(), "127.0.0.1:4001".parse().unwrap()),
        ("cache-v2".to_owned(), "127.0.0.1:4002".parse().unwrap()),
    ]
    .into();
    let base = env_of(&[
        ("HOME", "/home/u"),
        ("SHARED", "base"),
        ("NOTIFY_SOCKET", "/run/n"),
        ("WATCHDOG_USEC", "1"),
        ("WATCHDOG_PID", "1"),
        ("LISTEN_FDS", "1"),
        ("LISTEN_PID", "1"),
        ("PORT", "1"),
    ]);
    let env = web.app_env(&config, 2, Some(5000), &addrs, &base).unwrap();
    let map: BTreeMap<_, _> = env.iter().cloned().collect();
    let expected = env_of(&[
        ("HOME", "/home/u"),
        ("SHARED", "env"),
        ("FROM_FILE", "/home/u/x"),
        ("LITERAL", "${NOT_EXPANDED}"),
        ("API", "http://127.0.0.1:4001"),
        ("DB", "localhost"),
        ("PORT", "5000"),
        ("MESH_SERVICE", "web"),
        ("MESH_REPLICA", "2"),
        ("MESH_NAME", "shop"),
        ("API_URL", "http://127.0.0.1:4001"),
        ("API_ADDR", "127.0.0.1:4001"),
        ("CACHE_V2_ADDR", "127.0.0.1:4002"),
    ]);
    assert_eq!(map, expected);
    let argv = expand_words(&web.command, &env).unwrap();
    assert_eq!(argv, ["web", "--port", "5000"]);
    assert_eq!(
        Service::expand_words(&["${NOPE}".to_owned()], &env).unwrap_err(),
        "unknown variable `NOPE`"
    );
    assert!(
        web.app_env(&config, 0, Some(5000), &BTreeMap::new(), &base)
            .is_err()
    );
}

#[test]
fn durations() {
    assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
    assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    assert_eq!(
        parse_duration("1h1m1s1ms"),
        Ok(Duration::from_millis(3_661_001))
    );
    assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    for bad in [
        "", "10", "10 s", "1.5s", "10sec", "s", "-1s", "1d", "10S", " 1s", "1m 30s",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
    }
}

#[test]
fn line_and_column_count_characters() {
    let text = "a\nbé = 1\n";
    assert_eq!(line_col(text, 0), (1, 1));
    assert_eq!(line_col(text, 2), (2, 1));
    assert_eq!(line_col(text, 6), (2, 4));
    assert_eq!(line_col(text, 100), (3, 1));
}

#[test]
fn type_errors_in_tables_split_over_headers_are_all_reported() {
    let out = parse_err(
        "version = 1\n[services.web.health]\ninterval = 5\nhttp = 1\n[services.api]\ncommand = \"a\"\n[services.web]\nreplicas = true\ncommand = \"w\"\n",
    );
    assert_eq!(
        out,
        "mesh.toml:3:12: error: wrong type for `services.web.health.interval`: expected a duration string such as \"10s\", found integer `5`\n\
         mesh.toml:4:8: error: wrong type for `services.web.health.http`: expected a string, found integer `1`\n\
         mesh.toml:8:12: error: wrong type for `services.web.replicas`: expected an integer, found boolean `true`"
    );
}

#[test]
fn traffic_policies_reach_the_model_with_their_defaults() {
    let config = parse_ok(
        r#"version = 1
[services.api]
command = "api"
[services.api.traffic]
timeout = "10s"
retries = { per_try_timeout = "2s", on = ["5xx", "reset", "timeout", "409", "grpc:unavailable", "grpc:cancelled"] }
circuit_breaker = { consecutive_failures = 3, max_ejected_percent = 100 }
max_concurrent = 7
[services.web]
command = "web"
traffic = { retries = {} }
"#,
    );
    let api = &config.services["api"].traffic;
    assert_eq!(api.timeout, Some(Duration::from_secs(10)));
    assert_eq!(api.max_concurrent, 7);
    assert_eq!(
        api.retries,
        Some(Retries {
            attempts: 3,
            per_try_timeout: Some(Duration::from_secs(2)),
            on: vec![
                RetryOn::ServerError,
                RetryOn::Reset,
                RetryOn::Timeout,
                RetryOn::Status(409),
                RetryOn::Grpc(14),
                RetryOn::Grpc(1),
            ],
            budget: 0.2,
        })
    );
    assert_eq!(
        api.circuit_breaker,
        Some(CircuitBreaker {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 100,
        })
    );
    let web = &config.services["web"].traffic;
    assert_eq!(web.timeout, None);
    assert_eq!(web.max_concurrent, 10_000);
    assert_eq!(web.circuit_breaker, None);
    let retries = web.retries.as_ref().unwrap();
    assert_eq!(retries.on, [RetryOn::GatewayError]);
    assert_eq!((retries.attempts, retries.per_try_timeout), (3, None));
}

#[test]
fn ready_timeout_defaults_to_a_minute() {
    let config = parse_ok("version = 1\n[services.web]\ncommand = \"web\"\n");
    assert_eq!(
        config.services["web"].ready_timeout,
        Duration::from_secs(60)
    );
    let config =
        parse_ok("version = 1\n[services.web]\ncommand = \"web\"\nready_timeout = \"1m30s\"\n");
    assert_eq!(
        config.services["web"].ready_timeout,
        Duration::from_secs(90)
    );
}

#[test]
fn multi_host_keys_reach_the_model_with_their_defaults() {
    let alone = parse_ok("version = 1\n[services.web]\ncommand = \"web\"\n");
    assert_eq!(alone.mesh.listen.to_string(), "127.0.0.1");
    assert_eq!(alone.mesh.etcd, None);

    let config = parse_ok(
        r#"
version = 1
[mesh]
name = "shop"
listen = "10.0.0.5"
etcd = { endpoints = ["http://10.0.0.9:2379", "http://[fd00::9]", "http://etcd-2:2379/"] }

[services.web]
command = "web"
upstreams = ["api"]
depends_on = { api = "healthy", search = "started" }

[services.api]
protocol = "grpc"
expose = 8443
upstreams = ["search"]
allow = ["web", "ingress"]
traffic = { timeout = "2s" }
routes = [{ path_prefix = "/v2", backends = { search = 1 } }]

[services.search]
protocol = "grpc"
"#,
    );
    assert_eq!(config.mesh.listen.to_string(), "10.0.0.5");
    assert_eq!(config.mesh.host_id(), "10.0.0.5");
    let etcd = config.mesh.etcd.as_ref().unwrap();
    assert_eq!(etcd.endpoints.len(), 3);
    assert_eq!(etcd.prefix, "/mesh/shop");
    assert_eq!(etcd.lease_ttl, Duration::from_secs(10));
    let api = &config.services["api"];
    assert!(api.is_remote());
    assert_eq!(api.replicas, 0);
    assert!(api.command.is_empty());
    assert_eq!(api.protocol, Protocol::Grpc);
    assert_eq!(api.allow, ["web", "ingress"]);
    assert!(config.admitted_callers("api").contains("ingress"));
    assert!(!config.services["web"].is_remote());
    assert_eq!(config.services["web"].replicas, 1);

    let tuned = parse_ok(
        "version = 1\n[mesh]\nlisten = \"::1\"\netcd = { endpoints = [\"http://127.0.0.1:2379\"], prefix = \"/edge/eu\", lease_ttl = \"2s\" }\n",
    );
    let etcd = tuned.mesh.etcd.unwrap();
    assert_eq!(etcd.prefix, "/edge/eu");
    assert_eq!(etcd.lease_ttl, Duration::from_secs(2));
}

#[test]
fn multi_host_mistakes_are_reported() {
    let errors = parse_err(
        r#"
version = 1
[mesh]
listen = "0.0.0.0"
etcd = { endpoints = ["https://e:2379", "e:2379", "http://e:99999", "http://e/v3"], prefix = "mesh", lease_ttl = "1500ms" }

[services.api]
replicas = 2
health = { tcp = true }
"#,
    );
    for expected in [
        "`listen = \"0.0.0.0\"` cannot be advertised to other hosts with `etcd`",
        "invalid etcd endpoint \"https://e:2379\": TLS to etcd is not supported yet",
        "invalid etcd endpoint \"e:2379\": expected http://HOST:PORT",
        "invalid etcd endpoint \"http://e:99999\": the port must be",
        "invalid etcd endpoint \"http://e/v3\": a path or query is not supported",
        "`etcd.prefix` must start with `/`",
        "`etcd.lease_ttl` must be a whole number of seconds",
        "`replicas` describes a process, but service `api` has no `command`",
        "`health` describes a process, but service `api` has no `command`",
    ] {
        assert!(errors.contains(expected), "{expected:?} not in:\n{errors}");
    }
    let alone = parse_err("version = 1\n[services.api]\nexpose = 8080\n");
    assert!(
        alone.contains("service `api` has no `command`\nhelp: a service without `command` runs on other hosts, which needs `[mesh] etcd`"),
        "{alone}"
    );
    let completed = parse_err(
        "version = 1\n[mesh]\netcd = { endpoints = [\"http://e\"] }\n[services.web]\ncommand = \"web\"\ndepends_on = { api = \"completed\" }\n[services.api]\n",
    );
    assert!(
        completed.contains("service `api` runs on other hosts: this host cannot see it complete"),
        "{completed}"
    );
}
