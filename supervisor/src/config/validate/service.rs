//! Checks of each `[services.NAME]` and across services (references, cycles, ports),
//! and the start order.

// The parent's types and helpers are this module's vocabulary.
use super::*;
use crate::config::WatchPatterns;

// === services ===

pub(super) fn facts_of(raw: &RawService) -> Facts {
    let port = match raw.port.as_ref().map(Spanned::get_ref) {
        None | Some(RawPort::Number(0)) => Some(PortSpec::Assigned),
        Some(RawPort::Number(n)) => u16::try_from(*n).ok().map(PortSpec::Fixed),
        Some(RawPort::None) => Some(PortSpec::None),
    };
    let protocol = match raw.protocol.as_ref().map(|p| p.get_ref().as_str()) {
        None => Some(Protocol::Http),
        Some(p) => PROTOCOLS
            .iter()
            .find(|(name, _)| *name == p)
            .map(|(_, v)| *v),
    };
    let restart = match raw.restart.as_ref().map(|r| r.get_ref().as_str()) {
        None => Some(RestartPolicy::OnFailure),
        Some(r) => RESTART_POLICIES
            .iter()
            .find(|(name, _)| *name == r)
            .map(|(_, v)| *v),
    };
    Facts {
        port,
        protocol,
        restart,
        remote: raw.command.is_none(),
    }
}

const PROTOCOLS: &[(&str, Protocol)] = &[
    ("http", Protocol::Http),
    ("grpc", Protocol::Grpc),
    ("tcp", Protocol::Tcp),
];

const RESTART_POLICIES: &[(&str, RestartPolicy)] = &[
    ("always", RestartPolicy::Always),
    ("on-failure", RestartPolicy::OnFailure),
    ("never", RestartPolicy::Never),
];

const CONDITIONS: &[(&str, Condition)] = &[
    ("started", Condition::Started),
    ("healthy", Condition::Healthy),
    ("completed", Condition::Completed),
];

/// Checks one service. Returns it (if every part is valid) and its valid `depends_on`
/// edges with their spans, for the cycle check.
pub(super) fn check_service(
    ctx: &mut Ctx<'_>,
    p: &Parsed,
    scope: &Scope<'_>,
    bindings: &mut Vec<Binding>,
) -> (Option<Service>, BTreeMap<String, Range<usize>>) {
    let errors_before = ctx.diags.len();
    let raw = &p.raw;
    let name = p.name.as_str();
    if !is_valid_name(name) {
        ctx.error(
            p.span.clone(),
            format!("invalid service name `{name}`: use {NAME_RULE}"),
        );
    } else if RESERVED_NAMES.contains(&name) {
        ctx.error(p.span.clone(), format!("service name `{name}` is reserved"));
    }

    let replicas = match &raw.replicas {
        None => 1,
        Some(r) if *r.get_ref() < 1 => {
            ctx.error(r.span(), "`replicas` must be at least 1");
            1
        }
        Some(r) => u32::try_from(*r.get_ref()).unwrap_or_else(|_| {
            ctx.error(r.span(), "`replicas` is too large");
            1
        }),
    };
    let protocol = raw
        .protocol
        .as_ref()
        .map_or(Some(Protocol::Http), |p| {
            one_of(ctx, p, "protocol", PROTOCOLS)
        })
        .unwrap_or(Protocol::Http);
    let port = check_port(ctx, raw, name, replicas, bindings);
    let restart = raw
        .restart
        .as_ref()
        .map_or(Some(RestartPolicy::OnFailure), |r| {
            one_of(ctx, r, "restart", RESTART_POLICIES)
        })
        .unwrap_or(RestartPolicy::OnFailure);

    let upstreams = check_upstreams(ctx, raw, name, scope);
    let depends_on = check_depends_on(ctx, raw, name, scope);
    let dep_edges: BTreeMap<String, Range<usize>> = depends_on
        .iter()
        .map(|(target, (_, span))| (target.clone(), span.clone()))
        .collect();
    let depends_on: BTreeMap<String, Condition> = depends_on
        .into_iter()
        .map(|(target, (condition, _))| (target, condition))
        .collect();

    // The variables mesh sets for this service, which `env` may not set and `${}` may use.
    let mut table_vars: BTreeSet<String> =
        FIXED_TABLE_VARS.iter().map(|v| (*v).to_owned()).collect();
    if port != PortSpec::None {
        table_vars.insert("PORT".to_owned());
    }
    for upstream in &upstreams {
        let stem = Service::upstream_var_stem(upstream);
        table_vars.insert(format!("{stem}_ADDR"));
        let protocol = scope.facts.get(upstream).and_then(|f| f.protocol);
        if protocol != Some(Protocol::Tcp) {
            table_vars.insert(format!("{stem}_URL"));
        }
    }
    let lookup = |var: &str| -> Option<String> {
        if table_vars.contains(var) {
            // Any non-empty value does for validation: the real one is known at start.
            Some("1".to_owned())
        } else {
            scope.env.get(var).cloned()
        }
    };

    let mut remote = false;
    let command = match &raw.command {
        Some(command) => check_command(ctx, command, "command", &lookup),
        None => {
            if p.removed.contains("command")
                || ctx.suggested.contains(&format!("services.{name}.command"))
            {
                // A `command` of the wrong type or misspelt: reported already.
            } else if scope.federated {
                // SPEC §9: it runs on other hosts.
                remote = true;
                check_remote(ctx, p);
            } else {
                ctx.report(
                    p.span.clone(),
                    format!("service `{name}` has no `command`"),
                    Some(
                        "a service without `command` runs on other hosts, which needs `[mesh] etcd` (docs/multi-host.md)"
                            .to_owned(),
                    ),
                );
            }
            Vec::new()
        }
    };
    let working_dir = match &raw.working_dir {
        Some(wd) => {
            if wd.get_ref().is_empty() {
                ctx.error(wd.span(), "`working_dir` is empty");
            }
            scope.dir.join(wd.get_ref())
        }
        None => scope.dir.to_path_buf(),
    };
    let env = check_env(ctx, raw.env.as_ref(), &table_vars, &lookup);
    let env_file = raw
        .env_file
        .as_ref()
        .and_then(|f| check_env_file(ctx, f, scope.dir, &table_vars, &lookup));
    let user = non_empty(ctx, raw.user.as_ref(), "user");
    let group = non_empty(ctx, raw.group.as_ref(), "group");

    let backoff = {
        let b = raw.backoff.as_ref();
        let initial = duration_or(
            ctx,
            b.and_then(|b| b.initial.as_ref()),
            "backoff.initial",
            Duration::from_millis(100),
        );
        let max = duration_or(ctx, b.and_then(|b| b.max.as_ref()), "backoff.max", secs(30));
        if initial > max {
            let span = b
                .and_then(|b| b.initial.as_ref().or(b.max.as_ref()))
                .map(Spanned::span)
                .unwrap_or(p.span.clone());
            ctx.error(
                span,
                format!(
                    "`backoff.initial` ({}) is greater than `backoff.max` ({})",
                    humantime::format_duration(initial),
                    humantime::format_duration(max)
                ),
            );
        }
        Backoff { initial, max }
    };
    let start_limit = {
        let s = raw.start_limit.as_ref();
        let burst = match s.and_then(|s| s.burst.as_ref()) {
            None => 5,
            Some(b) => match u32::try_from(*b.get_ref()) {
                Ok(n) if n >= 1 => n,
                _ => {
                    ctx.error(b.span(), "`start_limit.burst` must be at least 1");
                    5
                }
            },
        };
        let interval = duration_or(
            ctx,
            s.and_then(|s| s.interval.as_ref()),
            "start_limit.interval",
            secs(60),
        );
        StartLimit { burst, interval }
    };
    let stop_signal = raw
        .stop_signal
        .as_ref()
        .and_then(|s| check_signal(ctx, s))
        .unwrap_or(Signal::SIGTERM);
    let stop_timeout = duration_or(ctx, raw.stop_timeout.as_ref(), "stop_timeout", secs(10));
    let ready_timeout = match &raw.ready_timeout {
        None => default_ready_timeout(),
        Some(value) => match duration(ctx, value, "ready_timeout") {
            // No replica could ever be ready in no time: every replacement would fail.
            Some(d) if d.is_zero() => {
                ctx.error(value.span(), "`ready_timeout` must be greater than 0");
                default_ready_timeout()
            }
            Some(d) => d,
            None => default_ready_timeout(),
        },
    };
    let health = raw
        .health
        .as_ref()
        .and_then(|h| check_health(ctx, h, p, port, &lookup));

    let expose = check_expose(ctx, raw, name, port, bindings);
    // Each pattern compiled as the watcher will compile it, so that a bad glob is
    // refused here, with its place in the file.
    let mut watch = Vec::new();
    for pattern in raw.watch.iter().flatten() {
        let text = pattern.get_ref();
        if text.is_empty() {
            ctx.error(pattern.span(), "empty `watch` pattern");
        } else if let Err(why) = WatchPatterns::new(std::slice::from_ref(text)) {
            ctx.error(
                pattern.span(),
                format!("invalid `watch` pattern `{text}`: {why}"),
            );
        }
        watch.push(text.clone());
    }
    let allow = check_allow(ctx, raw, name, scope);
    let traffic = raw
        .traffic
        .as_ref()
        .map(|t| check_traffic(ctx, t))
        .unwrap_or_default();
    let routes: Vec<_> = raw
        .routes
        .iter()
        .flatten()
        .filter_map(|route| check_route(ctx, route, name, protocol, scope))
        .collect();

    if ctx.diags.len() > errors_before {
        return (None, dep_edges);
    }
    // Nothing of a service that runs on other hosts is started here.
    let replicas = if remote { 0 } else { replicas };
    let service = Service {
        name: name.to_owned(),
        command,
        working_dir,
        env,
        env_file: env_file.as_ref().map(|(path, _)| path.clone()),
        env_file_digest: env_file.map(|(_, digest)| digest),
        user,
        group,
        replicas,
        protocol,
        port,
        upstreams,
        allow,
        depends_on,
        restart,
        backoff,
        start_limit,
        stop_signal,
        stop_timeout,
        watch,
        ready_timeout,
        health,
        expose,
        traffic,
        routes,
    };
    (Some(service), dep_edges)
}

/// A service without `command` (SPEC §9) keeps the keys that describe calls to it and by
/// it (`protocol`, `expose`, `upstreams`, `allow`, `traffic`, `routes`); each key that
/// describes a process here is an error.
fn check_remote(ctx: &mut Ctx<'_>, p: &Parsed) {
    let raw = &p.raw;
    let first = |spans: &mut dyn Iterator<Item = Range<usize>>| spans.next();
    let spanned: [(&str, Option<Range<usize>>); 16] = [
        ("working_dir", raw.working_dir.as_ref().map(Spanned::span)),
        (
            "env",
            raw.env.as_ref().map(|env| {
                first(&mut env.0.iter().map(|(k, _)| k.span())).unwrap_or(p.span.clone())
            }),
        ),
        ("env_file", raw.env_file.as_ref().map(Spanned::span)),
        ("user", raw.user.as_ref().map(Spanned::span)),
        ("group", raw.group.as_ref().map(Spanned::span)),
        ("replicas", raw.replicas.as_ref().map(Spanned::span)),
        ("port", raw.port.as_ref().map(Spanned::span)),
        (
            "depends_on",
            raw.depends_on.as_ref().map(|deps| {
                let mut spans: Box<dyn Iterator<Item = Range<usize>>> = match deps {
                    RawDependsOn::Table(entries) => Box::new(entries.iter().map(|(n, _)| n.span())),
                    RawDependsOn::List(names) => Box::new(names.iter().map(Spanned::span)),
                };
                first(&mut spans).unwrap_or(p.span.clone())
            }),
        ),
        ("restart", raw.restart.as_ref().map(Spanned::span)),
        (
            "backoff",
            raw.backoff.as_ref().map(|b| {
                first(&mut b.initial.iter().chain(&b.max).map(Spanned::span))
                    .unwrap_or(p.span.clone())
            }),
        ),
        (
            "start_limit",
            raw.start_limit.as_ref().map(|l| {
                let spans = l.burst.iter().map(Spanned::span);
                first(&mut spans.chain(l.interval.iter().map(Spanned::span)))
                    .unwrap_or(p.span.clone())
            }),
        ),
        ("stop_signal", raw.stop_signal.as_ref().map(Spanned::span)),
        ("stop_timeout", raw.stop_timeout.as_ref().map(Spanned::span)),
        (
            "watch",
            raw.watch
                .as_ref()
                .map(|w| first(&mut w.iter().map(Spanned::span)).unwrap_or(p.span.clone())),
        ),
        (
            "ready_timeout",
            raw.ready_timeout.as_ref().map(Spanned::span),
        ),
        ("health", raw.health.as_ref().map(Spanned::span)),
    ];
    let mut present: Vec<(&str, Range<usize>)> = spanned
        .into_iter()
        .filter_map(|(key, span)| Some((key, span?)))
        .collect();
    present.sort_by_key(|(_, span)| span.start);
    let mut helped = false;
    for (key, span) in present {
        // The way out once per service, not once per key.
        let help = (!std::mem::replace(&mut helped, true)).then(|| {
            "give it a `command` to run it here too, or remove the key (a service of other hosts keeps only `protocol`, `expose`, `upstreams`, `allow`, `traffic` and `routes`)"
                .to_owned()
        });
        ctx.report(
            span,
            format!(
                "`{key}` describes a process, but service `{}` has no `command`: it runs on other hosts",
                p.name
            ),
            help,
        );
    }
}

/// `allow`: services of this file. The reserved identities are refused with a reason:
/// the ingress of a service is admitted by that service alone (and its route backends),
/// and `test` by every inbound already.
fn check_allow(ctx: &mut Ctx<'_>, raw: &RawService, name: &str, scope: &Scope<'_>) -> Vec<String> {
    let mut allow = Vec::new();
    for caller in raw.allow.iter().flatten() {
        let caller_name = caller.get_ref();
        if caller_name == "ingress" && scope.federated {
            // The ingresses of other hosts that expose this service (or route to it):
            // nothing else says so in this host's file (docs/multi-host.md).
            if !allow.contains(caller_name) {
                allow.push(caller_name.clone());
            }
        } else if caller_name == "ingress" {
            ctx.report(
                caller.span(),
                "`allow` cannot name `ingress`: a service's ingress is admitted by that service alone",
                Some(format!("use `expose` on `{name}` to reach it from outside the mesh")),
            );
        } else if caller_name == "test" || caller_name == "mesh" {
            ctx.error(
                caller.span(),
                format!(
                    "`allow` cannot name `{caller_name}`: it is a reserved name, not a service"
                ),
            );
        } else if check_reference(ctx, caller, "allow", scope) && !allow.contains(caller_name) {
            allow.push(caller_name.clone());
        }
    }
    allow
}

fn check_port(
    ctx: &mut Ctx<'_>,
    raw: &RawService,
    name: &str,
    replicas: u32,
    bindings: &mut Vec<Binding>,
) -> PortSpec {
    let Some(port) = &raw.port else {
        return PortSpec::Assigned;
    };
    match port.get_ref() {
        RawPort::None => PortSpec::None,
        RawPort::Number(0) => PortSpec::Assigned,
        RawPort::Number(n) => match u16::try_from(*n) {
            Ok(fixed) => {
                if replicas > 1 {
                    ctx.report(
                        port.span(),
                        format!("fixed `port = {fixed}` cannot be shared by {replicas} replicas"),
                        Some("use `port = 0` to give each replica its own port".to_owned()),
                    );
                }
                bindings.push(Binding {
                    port: fixed,
                    ip: None,
                    span: port.span(),
                    owner: format!("`port` of service `{name}`"),
                });
                PortSpec::Fixed(fixed)
            }
            Err(_) => {
                ctx.error(port.span(), format!("port {n} is out of range (0-65535)"));
                PortSpec::Assigned
            }
        },
    }
}

fn check_expose(
    ctx: &mut Ctx<'_>,
    raw: &RawService,
    name: &str,
    port: PortSpec,
    bindings: &mut Vec<Binding>,
) -> Option<SocketAddr> {
    let expose = raw.expose.as_ref()?;
    if port == PortSpec::None {
        ctx.error(
            expose.span(),
            format!("service `{name}` has `port = \"none\"` and cannot be exposed"),
        );
    }
    let (port, ip) = match expose.get_ref() {
        RawExpose::Port(n) => match u16::try_from(*n) {
            Ok(p) => (p, None),
            Err(_) => {
                ctx.error(expose.span(), format!("port {n} is out of range (0-65535)"));
                return None;
            }
        },
        RawExpose::Addr(addr) => match addr.parse::<SocketAddr>() {
            Ok(a) => (a.port(), Some(a.ip())),
            Err(_) => {
                ctx.error(
                    expose.span(),
                    format!(
                        "invalid `expose` address \"{addr}\": expected a port or \"ADDR:PORT\""
                    ),
                );
                return None;
            }
        },
    };
    bindings.push(Binding {
        port,
        ip,
        span: expose.span(),
        owner: format!("`expose` of service `{name}`"),
    });
    Some(SocketAddr::new(
        ip.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        port,
    ))
}

pub(super) fn check_port_clashes(ctx: &mut Ctx<'_>, mut bindings: Vec<Binding>) {
    // Port 0 is assigned by the kernel and never clashes.
    bindings.retain(|b| b.port != 0);
    bindings.sort_by_key(|b| b.span.start);
    let loopback = IpAddr::from([127, 0, 0, 1]);
    for (i, later) in bindings.iter().enumerate() {
        let clash = bindings[..i].iter().find(|earlier| {
            let (a, b) = (earlier.ip.unwrap_or(loopback), later.ip.unwrap_or(loopback));
            earlier.port == later.port && (a == b || a.is_unspecified() || b.is_unspecified())
        });
        if let Some(earlier) = clash {
            ctx.error(
                later.span.clone(),
                format!("port {} is already used by {}", later.port, earlier.owner),
            );
        }
    }
}

fn check_upstreams(
    ctx: &mut Ctx<'_>,
    raw: &RawService,
    name: &str,
    scope: &Scope<'_>,
) -> Vec<String> {
    let mut upstreams = Vec::new();
    let mut stems: BTreeMap<String, String> = BTreeMap::new();
    for upstream in raw.upstreams.iter().flatten() {
        let target = upstream.get_ref();
        let stem = Service::upstream_var_stem(target);
        if let Some(previous) = stems.get(&stem) {
            if previous == target {
                ctx.error(
                    upstream.span(),
                    format!("`{target}` is listed twice in `upstreams`"),
                );
            } else {
                ctx.error(
                    upstream.span(),
                    format!("upstreams `{previous}` and `{target}` both map to `{stem}_ADDR`"),
                );
            }
            continue;
        }
        stems.insert(stem, target.clone());
        if target == name {
            ctx.error(
                upstream.span(),
                format!("service `{name}` lists itself in `upstreams`"),
            );
            continue;
        }
        if !check_reference(ctx, upstream, "upstreams", scope) {
            continue;
        }
        if scope.facts.get(target).and_then(|f| f.port) == Some(PortSpec::None) {
            ctx.error(
                upstream.span(),
                format!("service `{target}` has `port = \"none\"` and cannot be an upstream"),
            );
            continue;
        }
        upstreams.push(target.clone());
    }
    upstreams
}

/// Valid `depends_on` entries: target → (condition, span of the target's name).
fn check_depends_on(
    ctx: &mut Ctx<'_>,
    raw: &RawService,
    name: &str,
    scope: &Scope<'_>,
) -> BTreeMap<String, (Condition, Range<usize>)> {
    let entries: Vec<(&Spanned<String>, Option<&Spanned<String>>)> = match &raw.depends_on {
        None => Vec::new(),
        Some(RawDependsOn::List(names)) => names.iter().map(|n| (n, None)).collect(),
        Some(RawDependsOn::Table(entries)) => entries.iter().map(|(n, c)| (n, Some(c))).collect(),
    };
    let mut out = BTreeMap::new();
    for (target, condition) in entries {
        let condition = match condition {
            None => Some(Condition::Started),
            Some(c) => one_of(ctx, c, "depends_on", CONDITIONS),
        };
        let target_name = target.get_ref();
        if target_name == name {
            ctx.error(target.span(), format!("service `{name}` depends on itself"));
            continue;
        }
        if out.contains_key(target_name) {
            ctx.error(
                target.span(),
                format!("`{target_name}` is listed twice in `depends_on`"),
            );
            continue;
        }
        if !check_reference(ctx, target, "depends_on", scope) {
            continue;
        }
        let Some(condition) = condition else { continue };
        let remote = scope.federated && scope.facts.get(target_name).is_some_and(|f| f.remote);
        if condition == Condition::Completed && remote {
            let span = match &raw.depends_on {
                Some(RawDependsOn::Table(entries)) => entries
                    .iter()
                    .find(|(n, _)| n.get_ref() == target_name)
                    .map_or(target.span(), |(_, c)| c.span()),
                _ => target.span(),
            };
            ctx.report(
                span,
                format!(
                    "service `{target_name}` runs on other hosts: this host cannot see it complete"
                ),
                Some(format!(
                    "use `{target_name} = \"healthy\"`: wait until it has a ready endpoint somewhere"
                )),
            );
            continue;
        }
        if condition == Condition::Completed
            && scope.facts.get(target_name).and_then(|f| f.restart) == Some(RestartPolicy::Always)
        {
            let span = match &raw.depends_on {
                Some(RawDependsOn::Table(entries)) => entries
                    .iter()
                    .find(|(n, _)| n.get_ref() == target_name)
                    .map_or(target.span(), |(_, c)| c.span()),
                _ => target.span(),
            };
            ctx.error(
                span,
                format!(
                    "service `{target_name}` has `restart = \"always\"`, so it never completes"
                ),
            );
            continue;
        }
        out.insert(target_name.clone(), (condition, target.span()));
    }
    out
}

/// Reports a reference to a service that does not exist; true when it exists.
pub(super) fn check_reference(
    ctx: &mut Ctx<'_>,
    target: &Spanned<String>,
    key: &str,
    scope: &Scope<'_>,
) -> bool {
    let name = target.get_ref();
    if scope.facts.contains_key(name) {
        return true;
    }
    let help = suggest(name, scope.facts.keys().map(String::as_str))
        .map(|s| format!("did you mean `{s}`?"));
    ctx.report(
        target.span(),
        format!("`{key}` refers to unknown service `{name}`"),
        help,
    );
    false
}

/// Splits and checks a `command` or `health.exec`; returns the words, unexpanded.
fn check_command(
    ctx: &mut Ctx<'_>,
    command: &Spanned<RawCommand>,
    key: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Vec<String> {
    let words = match command.get_ref() {
        RawCommand::Line(line) => match shell_words::split(line) {
            Ok(words) => {
                check_interpolation(ctx, command.span(), key, line, lookup);
                words
            }
            Err(e) => {
                ctx.error(
                    command.span(),
                    format!("cannot split `{key}` like a shell: {e}"),
                );
                return Vec::new();
            }
        },
        RawCommand::Words(words) => {
            for word in words {
                check_interpolation(ctx, word.span(), key, word.get_ref(), lookup);
            }
            words.iter().map(|w| w.get_ref().clone()).collect()
        }
    };
    if words.first().is_none_or(|program| program.is_empty()) {
        ctx.error(command.span(), format!("`{key}` is empty"));
    }
    words
}

fn check_interpolation(
    ctx: &mut Ctx<'_>,
    span: Range<usize>,
    key: &str,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) {
    let Err(e) = interpolate::expand(text, lookup) else {
        return;
    };
    // Point at the `$` itself when the value is written as a plain one-line string, so
    // that source offsets and offsets in the value agree.
    let raw = ctx.text.get(span.clone()).unwrap_or_default();
    let plain = [format!("\"{text}\""), format!("'{text}'")].contains(&raw.to_owned());
    let span = if plain {
        span.start + 1 + e.offset()..span.end
    } else {
        span
    };
    let help = match &e {
        interpolate::InterpolateError::Unset { name, .. } => Some(format!(
            "set `{name}` in mesh's environment, or give a default: `${{{name}:-default}}`"
        )),
        _ => None,
    };
    ctx.report(span, format!("in `{key}`: {e}"), help);
}

fn check_env(
    ctx: &mut Ctx<'_>,
    env: Option<&OrderedMap<Spanned<String>, Spanned<EnvValue>>>,
    table_vars: &BTreeSet<String>,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (key, value) in env.map(|e| e.0.as_slice()).unwrap_or_default() {
        let var = key.get_ref();
        if var.is_empty() || var.contains(['=', '\0']) {
            ctx.error(
                key.span(),
                format!("invalid environment variable name `{var}`"),
            );
        } else if table_vars.contains(var) {
            ctx.error(
                key.span(),
                format!("`{var}` is set by mesh and cannot be set in `env`"),
            );
        }
        check_interpolation(
            ctx,
            value.span(),
            &format!("env.{var}"),
            &value.get_ref().0,
            lookup,
        );
        out.push((var.clone(), value.get_ref().0.clone()));
    }
    out
}

/// Reads and checks the `env_file` now (it is read again at each start). Returns its
/// absolute path and the digest of what it sets (see [`Service::env_file_digest`]).
fn check_env_file(
    ctx: &mut Ctx<'_>,
    file: &Spanned<String>,
    dir: &Path,
    table_vars: &BTreeSet<String>,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Option<(PathBuf, u64)> {
    let written = file.get_ref();
    let path = dir.join(written);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            ctx.error(
                file.span(),
                format!("cannot read env_file `{written}`: {e}"),
            );
            return None;
        }
    };
    let entries = match envfile::parse(&text) {
        Ok(entries) => entries,
        Err(e) => {
            ctx.error(file.span(), format!("invalid env_file `{written}`: {e}"));
            return None;
        }
    };
    let digest = env_file_digest(&entries);
    for entry in entries {
        if table_vars.contains(&entry.key) {
            ctx.error(
                file.span(),
                format!(
                    "env_file `{written}` line {} sets `{}`, which is set by mesh",
                    entry.line, entry.key
                ),
            );
        }
        if !entry.literal {
            if let Err(e) = interpolate::expand(&entry.value, lookup) {
                ctx.error(
                    file.span(),
                    format!("in env_file `{written}` line {}: {e}", entry.line),
                );
            }
        }
    }
    Some((path, digest))
}

/// What an env file sets, hashed: each entry's key, value as written and quoting, in file
/// order (a later duplicate wins, so order matters). Lines, comments and layout are left
/// out, so that reformatting the file is not a change. `DefaultHasher::new` hashes alike
/// within one program, which is all a reload's comparison needs.
fn env_file_digest(entries: &[envfile::Entry]) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    entries.len().hash(&mut hasher);
    for entry in entries {
        (&entry.key, &entry.value, entry.literal).hash(&mut hasher);
    }
    hasher.finish()
}

fn check_health(
    ctx: &mut Ctx<'_>,
    health: &Spanned<RawHealth>,
    p: &Parsed,
    port: PortSpec,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Option<Health> {
    let h = health.get_ref();
    let mut kinds: Vec<(Range<usize>, HealthCheck)> = Vec::new();
    if let Some(http) = &h.http {
        let path = http.get_ref();
        if !path.starts_with('/') && !path.starts_with('$') {
            ctx.error(
                http.span(),
                format!("`health.http` must be a path starting with `/`, not \"{path}\""),
            );
        }
        check_interpolation(ctx, http.span(), "health.http", path, lookup);
        if port == PortSpec::None {
            ctx.error(
                http.span(),
                "`health.http` needs a port, but the service has `port = \"none\"`",
            );
        }
        kinds.push((http.span(), HealthCheck::Http(path.clone())));
    }
    if let Some(tcp) = h.tcp.as_ref().filter(|t| *t.get_ref()) {
        if port == PortSpec::None {
            ctx.error(
                tcp.span(),
                "`health.tcp` needs a port, but the service has `port = \"none\"`",
            );
        }
        kinds.push((tcp.span(), HealthCheck::Tcp));
    }
    if let Some(exec) = &h.exec {
        let words = check_command(ctx, exec, "health.exec", lookup);
        kinds.push((exec.span(), HealthCheck::Exec(words)));
    }
    kinds.sort_by_key(|(span, _)| span.start);
    let interval = duration_or(ctx, h.interval.as_ref(), "health.interval", secs(2));
    let timeout = duration_or(ctx, h.timeout.as_ref(), "health.timeout", secs(1));
    for (value, key) in [
        (&h.interval, "health.interval"),
        (&h.timeout, "health.timeout"),
    ] {
        if let Some(v) = value {
            if parse_duration(&v.get_ref().0) == Ok(Duration::ZERO) {
                ctx.error(v.span(), format!("`{key}` must be greater than 0s"));
            }
        }
    }
    let failures = match &h.failures {
        None => 3,
        Some(f) => match u32::try_from(*f.get_ref()) {
            Ok(n) if n >= 1 => n,
            _ => {
                ctx.error(f.span(), "`health.failures` must be at least 1");
                3
            }
        },
    };
    let start_period = match &h.start_period {
        None => Duration::ZERO,
        Some(s) => duration(ctx, s, "health.start_period").unwrap_or_default(),
    };
    let restart_on_unhealthy = h.restart_on_unhealthy.unwrap_or(false);
    let mut kinds = kinds.into_iter();
    let Some((_, check)) = kinds.next() else {
        let removed = ["http", "tcp", "exec"].iter().any(|k| {
            p.removed.contains(&format!("health.{k}"))
                || ctx
                    .suggested
                    .contains(&format!("services.{}.health.{k}", p.name))
        });
        if !removed {
            ctx.error(
                health.span(),
                "`health` needs one of `http`, `tcp` or `exec`",
            );
        }
        return None;
    };
    for (span, _) in kinds {
        ctx.error(span, "`health` takes only one of `http`, `tcp` or `exec`");
    }
    Some(Health {
        check,
        interval,
        timeout,
        failures,
        start_period,
        restart_on_unhealthy,
    })
}

fn check_signal(ctx: &mut Ctx<'_>, signal: &Spanned<String>) -> Option<Signal> {
    let written = signal.get_ref();
    let full = if written.starts_with("SIG") {
        written.clone()
    } else {
        format!("SIG{written}")
    };
    if let Ok(parsed) = Signal::from_str(&full) {
        return Some(parsed);
    }
    let upper = full.to_ascii_uppercase();
    let help = if Signal::from_str(&upper).is_ok() {
        Some(upper)
    } else {
        // Compare without the common `SIG`, which would make every name look close.
        let bare = |s: &'static str| s.strip_prefix("SIG").unwrap_or(s);
        let wanted = upper.strip_prefix("SIG").unwrap_or(&upper);
        suggest(wanted, Signal::iterator().map(|s| bare(s.as_str()))).map(|s| format!("SIG{s}"))
    };
    ctx.report(
        signal.span(),
        format!("unknown signal \"{written}\" for `stop_signal`"),
        help.map(|s| format!("did you mean `{s}`?")),
    );
    None
}

// === cross-service checks ===

/// Reports every `depends_on` cycle found (one per back edge); true if there is one.
pub(super) fn check_cycles(
    ctx: &mut Ctx<'_>,
    edges: &BTreeMap<String, BTreeMap<String, Range<usize>>>,
) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeMap<String, Range<usize>>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
        cycles: &mut Vec<Vec<String>>,
    ) {
        marks.insert(node.to_owned(), Mark::Active);
        stack.push(node.to_owned());
        for next in edges.get(node).into_iter().flat_map(BTreeMap::keys) {
            match marks.get(next).copied().unwrap_or(Mark::New) {
                Mark::New => visit(next, edges, marks, stack, cycles),
                Mark::Active => {
                    let start = stack.iter().position(|n| n == next).unwrap_or(0);
                    cycles.push(stack[start..].to_vec());
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(node.to_owned(), Mark::Done);
    }
    let mut marks = BTreeMap::new();
    let mut cycles = Vec::new();
    for node in edges.keys() {
        if marks.get(node).copied().unwrap_or(Mark::New) == Mark::New {
            visit(node, edges, &mut marks, &mut Vec::new(), &mut cycles);
        }
    }
    for mut cycle in cycles.iter().cloned() {
        // Start the cycle at its smallest name, and report it at that service's edge.
        let min = (0..cycle.len()).min_by_key(|&i| &cycle[i]).unwrap_or(0);
        cycle.rotate_left(min);
        let span = edges
            .get(&cycle[0])
            .and_then(|targets| targets.get(&cycle[1 % cycle.len()]))
            .cloned()
            .unwrap_or(0..0);
        let mut names = cycle.clone();
        names.push(cycle[0].clone());
        ctx.error(span, format!("dependency cycle: {}", names.join(" -> ")));
    }
    !cycles.is_empty()
}

/// `depends_on` edges strictly, then `upstreams` (and route backend) edges where they
/// add no cycle (mutual upstreams are legal), ties broken by name.
pub(super) fn start_order(services: &BTreeMap<String, Service>) -> Vec<String> {
    // before[x] = services that must start before x.
    let mut before: BTreeMap<&str, BTreeSet<&str>> = services
        .values()
        .map(|s| {
            (
                s.name.as_str(),
                s.depends_on.keys().map(String::as_str).collect(),
            )
        })
        .collect();
    for service in services.values() {
        // A service's route backends are reached through it like upstreams, so they
        // start before it on the same terms (B == S adds nothing: it reaches itself).
        let route_backends = service
            .routes
            .iter()
            .flat_map(|r| r.backends.iter().map(|(b, _)| b));
        for upstream in service.upstreams.iter().chain(route_backends) {
            // Adding "upstream before service" closes a cycle if service already comes
            // (transitively) before upstream.
            if !reaches(&before, upstream, &service.name) {
                if let Some(set) = before.get_mut(service.name.as_str()) {
                    set.insert(upstream.as_str());
                }
            }
        }
    }
    let mut order = Vec::with_capacity(services.len());
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    while order.len() < services.len() {
        let next = before
            .iter()
            .find(|(name, deps)| !placed.contains(*name) && deps.iter().all(|d| placed.contains(d)))
            .map(|(name, _)| *name);
        // `depends_on` cycles were rejected and upstream edges never add one, so there is
        // always a next service; if not, stop rather than loop.
        let Some(next) = next else { break };
        placed.insert(next);
        order.push(next.to_owned());
    }
    order
}

/// Whether `to` must start before `from`, following `before` edges from `from`.
fn reaches(before: &BTreeMap<&str, BTreeSet<&str>>, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from];
    while let Some(node) = stack.pop() {
        if node == to {
            return true;
        }
        if seen.insert(node) {
            stack.extend(before.get(node).into_iter().flatten().copied());
        }
    }
    false
}
