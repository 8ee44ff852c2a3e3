//! `mesh check`: the resolved plan, and warnings about things that will fail at start.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use mesh_supervisor::config::{
    Condition, Config, HealthCheck, LocalPath, PortSpec, RestartPolicy, Service, TlsMode,
    default_ready_timeout,
};

/// The plan as `mesh check` prints it: start order, ports, identities.
pub(crate) fn render(config: &Config) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}: ok", config.path.display());
    let _ = writeln!(out, "mesh `{}`", config.mesh.name);
    let _ = writeln!(
        out,
        "  state_dir         {}",
        config.mesh.state_dir.display()
    );
    let _ = writeln!(
        out,
        "  shutdown_timeout  {}",
        humantime::format_duration(config.mesh.shutdown_timeout)
    );
    let tls = match (config.mesh.tls, &config.mesh.ca) {
        (TlsMode::Off, _) => "off (plain between sidecars, authorization not enforced)".to_string(),
        (TlsMode::Mutual, Some(ca)) => {
            format!("mutual (CA {} and {})", ca.cert.display(), ca.key.display())
        }
        (TlsMode::Mutual, None) => format!(
            "mutual (CA {}, created at the first start if missing)",
            config.mesh.state_dir.join("ca.crt").display()
        ),
    };
    let _ = writeln!(out, "  tls               {tls}");
    let local_path = match config.mesh.local_path {
        LocalPath::InProcess => {
            "in-process (calls between sidecars of this process cross no socket)"
        }
        LocalPath::Tls => {
            "tls (calls between sidecars of this process go through the inbounds' TLS listeners)"
        }
    };
    let _ = writeln!(out, "  local_path        {local_path}");
    let _ = writeln!(
        out,
        "  listen            {} (inbounds bind here{})",
        config.mesh.listen,
        if config.mesh.etcd.is_some() {
            "; advertised to other hosts"
        } else {
            ""
        }
    );
    match &config.mesh.etcd {
        None => {
            let _ = writeln!(out, "  etcd              off (this host alone)");
        }
        Some(etcd) => {
            let _ = writeln!(
                out,
                "  etcd              {} (host `{}`, keys under {}/endpoints/, lease {})",
                etcd.endpoints.join(", "),
                config.mesh.host_id(),
                etcd.prefix.trim_end_matches('/'),
                humantime::format_duration(etcd.lease_ttl)
            );
        }
    }
    let _ = writeln!(out, "start order:");
    for (i, name) in config.start_order.iter().enumerate() {
        let svc = &config.services[name];
        if svc.is_remote() {
            let _ = writeln!(
                out,
                "  {}. {name}  on other hosts (nothing started here; endpoints from etcd) identity=spiffe://{}/{name}",
                i + 1,
                config.mesh.name
            );
            render_calls(&mut out, config, svc);
            continue;
        }
        let port = match svc.port {
            PortSpec::Assigned => "port assigned at start".to_string(),
            PortSpec::Fixed(p) => format!("port {p}"),
            PortSpec::None => "no port".to_string(),
        };
        let restart = match svc.restart {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        };
        let _ = writeln!(
            out,
            "  {}. {name}  replicas={} {port} restart={restart} identity=spiffe://{}/{name}",
            i + 1,
            svc.replicas,
            config.mesh.name
        );
        let _ = writeln!(out, "       command: {}", shell_words::join(&svc.command));
        if !svc.depends_on.is_empty() {
            let remote = |t: &String| config.services.get(t).is_some_and(Service::is_remote);
            let deps: Vec<String> = svc
                .depends_on
                .iter()
                .map(|(t, c)| {
                    let c = match c {
                        Condition::Started => "started",
                        Condition::Healthy => "healthy",
                        Condition::Completed => "completed",
                    };
                    if remote(t) {
                        format!("{t} ({c}: a ready endpoint on another host)")
                    } else {
                        format!("{t} ({c})")
                    }
                })
                .collect();
            let _ = writeln!(out, "       depends_on: {}", deps.join(", "));
        }
        render_calls(&mut out, config, svc);
        if let Some(h) = &svc.health {
            let check = match &h.check {
                HealthCheck::Http(p) => format!("http {p}"),
                HealthCheck::Tcp => "tcp".into(),
                HealthCheck::Exec(w) => format!("exec {}", shell_words::join(w)),
            };
            let _ = writeln!(
                out,
                "       health: {check} every {}",
                humantime::format_duration(h.interval)
            );
        }
        if svc.ready_timeout != default_ready_timeout() {
            let _ = writeln!(
                out,
                "       ready_timeout: {} (a replacement not ready by then is stopped, the old replica kept)",
                humantime::format_duration(svc.ready_timeout)
            );
        }
    }
    out
}

/// What a service calls and who calls it: the lines of the keys that describe calls,
/// which a service of other hosts keeps too.
fn render_calls(out: &mut String, config: &Config, svc: &Service) {
    if !svc.upstreams.is_empty() {
        let how = if svc.is_remote() {
            "authorizes its calls from other hosts"
        } else {
            "each through an outbound sidecar on an assigned port"
        };
        let _ = writeln!(
            out,
            "       upstreams: {} ({how})",
            svc.upstreams.join(", ")
        );
    }
    if !svc.allow.is_empty() {
        let _ = writeln!(out, "       allow: {}", svc.allow.join(", "));
    }
    if let Some(addr) = svc.expose {
        let _ = writeln!(
            out,
            "       expose: ingress on {addr} (identity spiffe://{}/ingress)",
            config.mesh.name
        );
    }
    if let Some(rl) = &svc.traffic.rate_limit {
        let where_ = if svc.is_remote() {
            "per replica, applied by the hosts that run it, as their files say"
        } else {
            "per replica"
        };
        let _ = writeln!(
            out,
            "       rate_limit: {} rps, burst {} ({where_})",
            rl.rps, rl.burst
        );
    }
    if let Some(line) = traffic_line(&svc.traffic) {
        let _ = writeln!(out, "       traffic (applied by callers): {line}");
    }
    render_routes(out, svc);
}

/// The policies callers apply to a service, when any differs from the defaults.
fn traffic_line(t: &mesh_supervisor::config::Traffic) -> Option<String> {
    let d = humantime::format_duration;
    let mut parts = Vec::new();
    if let Some(timeout) = t.timeout {
        parts.push(format!("timeout {}", d(timeout)));
    }
    if let Some(r) = &t.retries {
        let on: Vec<String> =
            r.on.iter()
                .map(|c| match c {
                    mesh_supervisor::config::RetryOn::GatewayError => "gateway-error".to_string(),
                    mesh_supervisor::config::RetryOn::ServerError => "5xx".to_string(),
                    mesh_supervisor::config::RetryOn::Reset => "reset".to_string(),
                    mesh_supervisor::config::RetryOn::Timeout => "timeout".to_string(),
                    mesh_supervisor::config::RetryOn::Status(s) => s.to_string(),
                    mesh_supervisor::config::RetryOn::Grpc(code) => format!("grpc code {code}"),
                })
                .collect();
        let mut retries = format!(
            "retries {} tries on {} (budget {})",
            r.attempts,
            on.join(", "),
            r.budget
        );
        if let Some(per_try) = r.per_try_timeout {
            retries.push_str(&format!(", {} per try", d(per_try)));
        }
        parts.push(retries);
    }
    if let Some(cb) = &t.circuit_breaker {
        parts.push(format!(
            "circuit breaker after {} failures, ejection {}..{}, at most {}%",
            cb.consecutive_failures,
            d(cb.base_ejection),
            d(cb.max_ejection),
            cb.max_ejected_percent
        ));
    }
    if t.max_concurrent != 10_000 {
        parts.push(format!("max_concurrent {}", t.max_concurrent));
    }
    if t.load_balancer != mesh_supervisor::config::LoadBalancer::P2cEwma {
        parts.push("round-robin".to_string());
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// `routes:` lines, one per route in match order (empty without routes).
fn render_routes(out: &mut String, svc: &Service) {
    if svc.routes.is_empty() {
        return;
    }
    let _ = writeln!(out, "       routes (first match wins, else {}):", svc.name);
    for (i, route) in svc.routes.iter().enumerate() {
        let mut conditions: Vec<String> = route.path_prefix.iter().cloned().collect();
        conditions.extend(route.headers.iter().map(|(n, v)| format!("{n}: {v}")));
        let when = if conditions.is_empty() {
            "everything".to_owned()
        } else {
            conditions.join(" and ")
        };
        let to: Vec<String> = route
            .backends
            .iter()
            .map(|(b, w)| format!("{b} {w}"))
            .collect();
        let mut line = format!("         {i}. {when} -> {}", to.join(", "));
        if let Some(t) = route.timeout {
            let _ = write!(line, "; timeout {}", humantime::format_duration(t));
        }
        if let Some(f) = &route.fault {
            if let Some(d) = f.delay {
                let _ = write!(
                    line,
                    "; delay {} {}%",
                    humantime::format_duration(d),
                    f.delay_percent
                );
            }
            if let Some(status) = f.abort {
                let _ = write!(line, "; abort {status} {}%", f.abort_percent);
            }
        }
        let _ = writeln!(out, "{line}");
    }
}

/// Problems that validation cannot call errors but that will make a start fail: a
/// program or working_dir that does not exist (SPEC §3: a spawn error; `mesh check` warns),
/// CA files that cannot be read; `tls = "off"`, which runs but should not last; routes
/// that can never match, because an earlier route matches everything.
pub(crate) fn warnings(config: &Config, env: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    if config.mesh.tls == TlsMode::Off {
        out.push(
            "tls = \"off\": traffic between sidecars is plain text and unauthenticated, and \
             authorization (`upstreams`, `allow`) is NOT enforced; use it for debugging only"
                .to_string(),
        );
    }
    if let Some(ca) = &config.mesh.ca {
        for path in [&ca.cert, &ca.key] {
            if let Err(e) = std::fs::read(path) {
                out.push(format!("`ca`: cannot read {}: {e}", path.display()));
            }
        }
    }
    if config.mesh.etcd.is_some() && config.mesh.listen.is_loopback() {
        out.push(format!(
            "`listen` is {}: other hosts cannot reach this host's inbounds there; set it to this host's address on the network the hosts share",
            config.mesh.listen
        ));
    }
    for name in &config.start_order {
        let svc = &config.services[name];
        let catch_all = svc.routes.iter().position(|r| {
            r.path_prefix.as_deref().is_none_or(|p| p == "/") && r.headers.is_empty()
        });
        if svc.port == PortSpec::None
            && (!svc.routes.is_empty() || svc.traffic.rate_limit.is_some())
        {
            out.push(format!(
                "service `{name}` has `port = \"none\"`: nothing calls it, so its routes and rate limit never apply"
            ));
        }
        if let Some(first) = catch_all {
            for later in first + 1..svc.routes.len() {
                out.push(format!(
                    "service `{name}`: route {later} never matches: route {first} takes every request"
                ));
            }
        }
        if !svc.working_dir.is_dir() {
            out.push(format!(
                "service `{name}`: working_dir {} does not exist",
                svc.working_dir.display()
            ));
            continue;
        }
        let Some(program) = svc.command.first() else {
            continue;
        };
        if program.contains('$') {
            continue; // known only at start
        }
        if !program_exists(
            program,
            &svc.working_dir,
            env.get("PATH").map(String::as_str),
        ) {
            out.push(format!("service `{name}`: program `{program}` not found"));
        }
    }
    out
}

fn program_exists(program: &str, cwd: &Path, path: Option<&str>) -> bool {
    if program.contains('/') {
        let p = PathBuf::from(program);
        let p = if p.is_absolute() { p } else { cwd.join(p) };
        return p.is_file();
    }
    path.unwrap_or("/usr/local/bin:/usr/bin:/bin")
        .split(':')
        .any(|dir| Path::new(dir).join(program).is_file())
}
