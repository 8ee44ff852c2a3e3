//! `routes`, `traffic.rate_limit` and `[mesh] seed` in the model; admission and
//! selection through route backends.

use super::*;
use crate::supervisor::selected;

const SHOP: &str = r#"
version = 1
[mesh]
seed = 7

[services.web]
command = "w"
upstreams = ["api"]

[services.admin]
command = "a"
port = "none"
upstreams = ["api-v2"]

[services.api]
command = "api"
expose = 0
traffic = { rate_limit = { rps = 2.5 } }

[[services.api.routes]]
path_prefix = "/v2/"
headers = { X-Canary = "1", x-team = "Blue" }
backends = { api-v2 = 90, api = 10 }
timeout = "2s"
fault = { delay = "100ms", abort = 503, abort_percent = 1.5 }

[[services.api.routes]]
backends = { api-v3 = 1 }

[services.api-v2]
command = "api --v2"
traffic = { rate_limit = { rps = 100, burst = 5 } }

[services.api-v3]
command = "api --v3"

[services.other]
command = "o"
"#;

#[test]
fn routes_rate_limits_and_seed_are_read() {
    let config = parse_ok(SHOP);
    assert_eq!(config.mesh.seed, Some(7));
    let api = &config.services["api"];
    assert_eq!(
        api.traffic.rate_limit,
        Some(RateLimit { rps: 2.5, burst: 3 }),
        "burst defaults to one second's worth, rounded up"
    );
    assert_eq!(
        config.services["api-v2"].traffic.rate_limit,
        Some(RateLimit {
            rps: 100.0,
            burst: 5
        })
    );
    assert_eq!(config.services["web"].traffic.rate_limit, None);
    assert_eq!(
        api.routes[0],
        Route {
            path_prefix: Some("/v2".into()),
            headers: vec![
                ("x-canary".into(), "1".into()),
                ("x-team".into(), "Blue".into())
            ],
            backends: vec![("api-v2".into(), 90), ("api".into(), 10)],
            timeout: Some(Duration::from_secs(2)),
            fault: Some(Fault {
                delay: Some(Duration::from_millis(100)),
                delay_percent: 100.0,
                abort: Some(503),
                abort_percent: 1.5,
            }),
        }
    );
    assert_eq!(api.routes[1].path_prefix, None);
    assert_eq!(api.routes[1].fault, None);
    assert!(config.services["web"].routes.is_empty());
}

#[test]
fn mesh_seed_environment_overrides_the_file() {
    let path = Path::new("/srv/shop/mesh.toml");
    let config = parse(SHOP, path, &env_of(&[("MESH_SEED", "99")])).unwrap();
    assert_eq!(config.mesh.seed, Some(99));
    let unseeded = parse_ok("version = 1\n");
    assert_eq!(unseeded.mesh.seed, None);
    let errors = parse("version = 1\n", path, &env_of(&[("MESH_SEED", "x")]))
        .unwrap_err()
        .to_string();
    assert!(errors.contains("`MESH_SEED`"), "{errors}");
}

#[test]
fn route_backends_admit_the_callers_of_their_service() {
    let config = parse_ok(SHOP);
    let set = |names: &[&str]| -> std::collections::BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    };
    // api: its upstream caller and its own ingress.
    assert_eq!(config.admitted_callers("api"), set(&["ingress", "web"]));
    // api-v2: its own caller, plus everyone admitted to api (whose route names it).
    assert_eq!(
        config.admitted_callers("api-v2"),
        set(&["admin", "ingress", "web"])
    );
    assert_eq!(config.admitted_callers("api-v3"), set(&["ingress", "web"]));
    assert_eq!(config.admitted_callers("other"), set(&[]));
    assert_eq!(config.admitted_callers("web"), set(&[]));
}

#[test]
fn a_service_starts_with_its_route_backends() {
    let config = parse_ok(SHOP);
    let only = ["web".to_owned()];
    let mut chosen = selected(&config, Some(&only));
    chosen.sort();
    assert_eq!(chosen, ["api", "api-v2", "api-v3", "web"]);
    // Route backends start before the service that routes to them, like upstreams.
    let pos = |s: &str| config.start_order.iter().position(|n| n == s).unwrap();
    assert!(pos("api-v2") < pos("api") && pos("api-v3") < pos("api"));
    assert!(pos("api") < pos("web"));
}
