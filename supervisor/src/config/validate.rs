//! `mesh.toml` text → [`Config`], collecting every error.
//!
//! The passes, each feeding the next and each reporting all it finds:
//! 1. TOML syntax (`DeTable::parse`): only the first error, as the rest would be noise.
//! 2. A walk of the spanned tree against the key schema in `raw`: every unknown key, with
//!    a suggestion, and every key that is not supported yet. Unknown keys are then removed.
//! 3. Serde, piecewise (`[mesh]`, then each service), so a type error in one service does
//!    not hide one in another. After a type error the offending entry is removed and the
//!    piece deserialized again, so all type errors within a piece are found too.
//! 4. Semantic checks on the raw values, which keep their spans.

mod service;
mod traffic;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use self::service::{
    check_cycles, check_port_clashes, check_reference, check_service, facts_of, start_order,
};
use self::traffic::{check_route, check_traffic};
use super::raw::{
    self, DurationStr, EnvValue, Field, OrderedMap, RawCommand, RawDependsOn, RawExpose, RawHealth,
    RawMesh, RawPort, RawRoute, RawService, RawTraffic, Shape,
};
use super::{
    AccessLog, Backoff, CaFiles, Condition, Config, Diagnostic, Etcd, Health, HealthCheck,
    LocalPath, MeshSettings, PortSpec, Protocol, RestartPolicy, Service, Signal, StartLimit,
    TlsMode, default_ready_timeout, envfile, interpolate,
};

/// Validates `text`, the contents of the file at `path`, against mesh's environment `env`.
pub(crate) fn validate(
    text: &str,
    path: &Path,
    env: &BTreeMap<String, String>,
) -> Result<Config, Vec<Diagnostic>> {
    let mut ctx = Ctx {
        text,
        path,
        diags: Vec::new(),
        suggested: BTreeSet::new(),
    };
    let config = check_file(&mut ctx, env);
    match config {
        Some(config) if ctx.diags.is_empty() => Ok(config),
        _ => {
            // Stable, so errors at one position keep the order they were found in.
            ctx.diags.sort_by_key(|d| (d.line, d.col));
            Err(ctx.diags)
        }
    }
}

/// Service names: `[a-z][a-z0-9-]{0,62}`. Mesh names follow the same rule.
pub(crate) fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// Names that identify something other than a service (`spiffe://<name>/ingress`, …).
const RESERVED_NAMES: &[&str] = &["ingress", "test", "mesh"];

/// Variables mesh sets for every service (SPEC §2), besides `PORT` and the upstreams'.
const FIXED_TABLE_VARS: &[&str] = &["MESH_SERVICE", "MESH_REPLICA", "MESH_NAME"];

const NAME_RULE: &str =
    "lowercase letters, digits and `-`, starting with a letter, at most 63 characters";

/// Collects diagnostics and turns byte offsets into lines and columns.
struct Ctx<'a> {
    text: &'a str,
    path: &'a Path,
    diags: Vec<Diagnostic>,
    /// Dotted paths of the keys suggested for unknown keys (`services.web.command` for
    /// `comand`): a "missing" error for them would repeat the same mistake.
    suggested: BTreeSet<String>,
}

/// What other services need to know about a service, computed before the full check.
struct Facts {
    port: Option<PortSpec>,
    protocol: Option<Protocol>,
    restart: Option<RestartPolicy>,
    /// Declared without `command`: it runs on other hosts.
    remote: bool,
}

/// One service after serde: its name, where the name is, and which entries were dropped
/// because of a type error (so that "missing" checks do not fire for them).
struct Parsed {
    name: String,
    span: Range<usize>,
    raw: RawService,
    removed: BTreeSet<String>,
}

/// Everything a service check needs to see of the rest of the file.
struct Scope<'a> {
    env: &'a BTreeMap<String, String>,
    dir: &'a Path,
    facts: &'a BTreeMap<String, Facts>,
    /// Whether `[mesh] etcd` is set: services may then run on other hosts.
    federated: bool,
}

/// A port that something binds, for the clash check.
struct Binding {
    port: u16,
    /// `None` for 127.0.0.1, the default.
    ip: Option<IpAddr>,
    span: Range<usize>,
    owner: String,
}

// === the passes ===

fn check_file(ctx: &mut Ctx<'_>, env: &BTreeMap<String, String>) -> Option<Config> {
    let mut root = match DeTable::parse(ctx.text) {
        Ok(root) => root.into_inner(),
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let mut message = e.message().to_owned();
            let key = ctx.text.get(span.clone()).unwrap_or_default();
            if message == "duplicate key" && !key.is_empty() {
                message = format!("duplicate key `{key}`");
            }
            ctx.error(span, message);
            return None;
        }
    };
    walk_table(ctx, &mut root, raw::FILE, &Header::root());

    check_version(ctx, &root);
    let path = std::path::absolute(ctx.path).unwrap_or_else(|_| ctx.path.to_path_buf());
    let dir = path
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);

    let (raw_mesh, mesh_removed) = match root.get("mesh") {
        Some(value) => deserialize_piece::<RawMesh>(ctx, value.clone(), "mesh"),
        None => (Some(RawMesh::default()), BTreeSet::new()),
    };
    let parsed = parse_services(ctx, &root);

    // Services without `command` run on other hosts, which takes `[mesh] etcd`.
    let federated = raw_mesh.as_ref().is_some_and(|m| m.etcd.is_some());
    let mesh = raw_mesh.and_then(|m| check_mesh(ctx, m, &mesh_removed, &dir, env));

    let facts: BTreeMap<String, Facts> = parsed
        .iter()
        .map(|p| (p.name.clone(), facts_of(&p.raw)))
        .collect();
    let scope = Scope {
        env,
        dir: &dir,
        facts: &facts,
        federated,
    };
    let mut services = BTreeMap::new();
    let mut bindings = Vec::new();
    let mut edges: BTreeMap<String, BTreeMap<String, Range<usize>>> = BTreeMap::new();
    let mut complete = true;
    for p in &parsed {
        let (service, deps) = check_service(ctx, p, &scope, &mut bindings);
        edges.insert(p.name.clone(), deps);
        match service {
            Some(service) => {
                services.insert(p.name.clone(), service);
            }
            None => complete = false,
        }
    }
    check_port_clashes(ctx, bindings);
    let cyclic = check_cycles(ctx, &edges);

    let mesh = mesh?;
    if !complete || cyclic {
        return None;
    }
    let start_order = start_order(&services);
    Some(Config {
        path,
        dir,
        mesh,
        services,
        start_order,
    })
}

/// Where a table is, for "unknown key … in `[services.web]`".
#[derive(Clone)]
struct Header {
    path: String,
    array: bool,
}

impl Header {
    fn root() -> Self {
        Header {
            path: String::new(),
            array: false,
        }
    }

    fn child(&self, key: &str, array: bool) -> Self {
        let path = if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        };
        Header { path, array }
    }

    fn describe(&self) -> String {
        match (self.path.is_empty(), self.array) {
            (true, _) => "at the top level".to_owned(),
            (false, false) => format!("in `[{}]`", self.path),
            (false, true) => format!("in `[[{}]]`", self.path),
        }
    }
}

/// Reports unknown and not-yet-supported keys in `table`, recursively, and removes the
/// unknown ones so that serde does not stop at them.
fn walk_table(ctx: &mut Ctx<'_>, table: &mut DeTable<'_>, fields: &[Field], header: &Header) {
    let mut unknown = Vec::new();
    for (key, value) in table.iter_mut() {
        let name: &str = key.get_ref();
        let Some(field) = fields.iter().find(|f| f.name == name) else {
            let suggestion = suggest(name, fields.iter().map(|f| f.name));
            if let Some(s) = suggestion {
                ctx.suggested.insert(header.child(s, false).path);
            }
            let help = suggestion.map(|s| format!("did you mean `{s}`?"));
            ctx.report(
                key.span(),
                format!("unknown key `{name}` {}", header.describe()),
                help,
            );
            unknown.push(name.to_owned());
            continue;
        };
        if !field.supported {
            // Inside a service, name the key as in `traffic.timeout` so it is unambiguous.
            let qualified = match header
                .path
                .split_once('.')
                .and_then(|(_, rest)| rest.split_once('.'))
            {
                Some((_, within)) => format!("{within}.{name}"),
                None => name.to_owned(),
            };
            ctx.error(key.span(), format!("`{qualified}` is not supported yet"));
        }
        walk_value(ctx, value, &field.shape, &header.child(name, false));
    }
    for name in unknown {
        table.remove(name.as_str());
    }
}

fn walk_value(ctx: &mut Ctx<'_>, value: &mut Spanned<DeValue<'_>>, shape: &Shape, header: &Header) {
    match (shape, value.get_mut()) {
        (Shape::Leaf, _) => {}
        (Shape::Table(fields), DeValue::Table(table)) => walk_table(ctx, table, fields, header),
        (Shape::MapOf(inner), DeValue::Table(table)) => {
            for (key, value) in table.iter_mut() {
                let name: &str = key.get_ref();
                walk_value(ctx, value, inner, &header.child(name, false));
            }
        }
        (Shape::ArrayOf(inner), DeValue::Array(array)) => {
            let header = Header {
                array: true,
                ..header.clone()
            };
            for value in array.iter_mut() {
                walk_value(ctx, value, inner, &header);
            }
        }
        // A wrong type: serde reports it in the next pass.
        _ => {}
    }
}

fn check_version(ctx: &mut Ctx<'_>, root: &DeTable<'_>) {
    let Some(value) = root.get("version") else {
        ctx.report(
            0..0,
            "missing `version`",
            Some("add `version = 1` at the top of the file".to_owned()),
        );
        return;
    };
    let version = <i64 as serde::Deserialize>::deserialize(ValueDeserializer::from(value.clone()));
    match version.ok() {
        Some(1) => {}
        Some(n) => ctx.error(
            value.span(),
            format!("unsupported version {n}: only `version = 1` is known"),
        ),
        None => ctx.error(value.span(), "`version` must be the integer 1"),
    }
}

/// Deserializes one piece of the file; see the module docs for the retry on type errors.
/// Returns the value (if the piece itself has the right shape) and the removed entries.
fn deserialize_piece<T: DeserializeOwned>(
    ctx: &mut Ctx<'_>,
    mut value: Spanned<DeValue<'_>>,
    prefix: &str,
) -> (Option<T>, BTreeSet<String>) {
    let mut removed = BTreeSet::new();
    loop {
        let error = match T::deserialize(ValueDeserializer::from(value.clone())) {
            Ok(piece) => return (Some(piece), removed),
            Err(error) => error,
        };
        let span = error.span().unwrap_or_else(|| value.span());
        let entry = match value.get_mut() {
            DeValue::Table(table) => remove_at(table, span.start),
            _ => None,
        };
        let key = match &entry {
            Some(entry) => format!("{prefix}.{entry}"),
            None => prefix.to_owned(),
        };
        ctx.error(span, serde_message(error.message(), &key));
        match entry {
            Some(entry) => {
                removed.insert(entry);
            }
            None => return (None, removed),
        }
    }
}

/// Removes the innermost table entry whose key or value contains `pos`, returning its
/// dotted path. Tables defined by several headers have a span that covers only one of
/// them, so every child is searched rather than only those whose span contains `pos`.
fn remove_at(table: &mut DeTable<'_>, pos: usize) -> Option<String> {
    let mut hit = None;
    for (key, value) in table.iter_mut() {
        let name: &str = key.get_ref();
        match value.get_mut() {
            DeValue::Table(inner) => {
                if let Some(path) = remove_at(inner, pos) {
                    return Some(format!("{name}.{path}"));
                }
            }
            DeValue::Array(array) => {
                for (i, element) in array.iter_mut().enumerate() {
                    if let DeValue::Table(inner) = element.get_mut() {
                        if let Some(path) = remove_at(inner, pos) {
                            return Some(format!("{name}[{i}].{path}"));
                        }
                    }
                }
            }
            _ => {}
        }
        if hit.is_none() && (value.span().contains(&pos) || key.span().contains(&pos)) {
            hit = Some(name.to_owned());
        }
    }
    let hit = hit?;
    table.remove(hit.as_str());
    Some(hit)
}

/// Rewords serde's messages for people who write TOML rather than Rust.
fn serde_message(message: &str, key: &str) -> String {
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            return format!(
                "wrong type for `{key}`: expected {}, found {}",
                human_type(expected),
                human_type(found)
            );
        }
    }
    if let Some(rest) = message.strip_prefix("invalid value: ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            return format!(
                "invalid value for `{key}`: expected {}, found {found}",
                human_type(expected)
            );
        }
    }
    format!("invalid `{key}`: {message}")
}

fn human_type(text: &str) -> String {
    if text.starts_with("struct ") {
        return "a table".to_owned();
    }
    match text {
        "i64" | "u64" | "u32" | "u16" => "an integer".to_owned(),
        "f64" => "a number".to_owned(),
        "a sequence" => "an array".to_owned(),
        "a map" => "a table".to_owned(),
        "sequence" => "an array".to_owned(),
        "map" => "a table".to_owned(),
        other => other.to_owned(),
    }
}

fn parse_services(ctx: &mut Ctx<'_>, root: &DeTable<'_>) -> Vec<Parsed> {
    let Some(services) = root.get("services") else {
        return Vec::new();
    };
    let DeValue::Table(table) = services.get_ref() else {
        let found = services.get_ref().type_str();
        ctx.error(
            services.span(),
            format!("wrong type for `services`: expected a table, found {found}"),
        );
        return Vec::new();
    };
    let mut parsed = Vec::new();
    for (key, value) in table.iter() {
        let name: &str = key.get_ref();
        let prefix = format!("services.{name}");
        let (raw, removed) = deserialize_piece::<RawService>(ctx, value.clone(), &prefix);
        if let Some(raw) = raw {
            parsed.push(Parsed {
                name: name.to_owned(),
                span: key.span(),
                raw,
                removed,
            });
        }
    }
    parsed
}

// === [mesh] ===

fn check_mesh(
    ctx: &mut Ctx<'_>,
    raw: RawMesh,
    removed: &BTreeSet<String>,
    dir: &Path,
    env: &BTreeMap<String, String>,
) -> Option<MeshSettings> {
    let name = match &raw.name {
        Some(name) => {
            if !is_valid_name(name.get_ref()) {
                ctx.error(
                    name.span(),
                    format!("invalid mesh name `{}`: use {NAME_RULE}", name.get_ref()),
                );
            }
            name.get_ref().clone()
        }
        None => {
            let dir_name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // Like docker compose's project name: the directory's name, normalised.
            let name = normalise_name(&dir_name);
            // A `name` that was misspelt or had the wrong type is already reported.
            let attempted = removed.contains("name") || ctx.suggested.contains("mesh.name");
            if name.is_empty() && !attempted {
                ctx.report(
                    0..0,
                    format!("the directory name `{dir_name}` cannot be made into a mesh name"),
                    Some(format!("set `name` in `[mesh]` ({NAME_RULE})")),
                );
            }
            name
        }
    };
    let state_dir = match &raw.state_dir {
        Some(state_dir) => {
            if state_dir.get_ref().is_empty() {
                ctx.error(state_dir.span(), "`state_dir` is empty");
            }
            dir.join(state_dir.get_ref())
        }
        None => {
            // `STATE_DIRECTORY` may list several directories, separated by `:`.
            let systemd = env.get("STATE_DIRECTORY").and_then(|s| s.split(':').next());
            let chosen = env
                .get("MESH_STATE_DIR")
                .map(String::as_str)
                .or(systemd)
                .unwrap_or(".mesh");
            dir.join(chosen)
        }
    };
    let shutdown_timeout = duration_or(
        ctx,
        raw.shutdown_timeout.as_ref(),
        "shutdown_timeout",
        secs(30),
    );

    let default_admin = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
    let admin = match &raw.admin {
        None => Some(default_admin),
        Some(admin) if admin.get_ref() == "off" => None,
        Some(admin) => match admin.get_ref().parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                ctx.error(
                    admin.span(),
                    format!(
                        "invalid `admin` address \"{}\": expected \"ADDR:PORT\" or \"off\"",
                        admin.get_ref()
                    ),
                );
                None
            }
        },
    };

    let tls = raw
        .tls
        .as_ref()
        .and_then(|tls| {
            one_of(
                ctx,
                tls,
                "tls",
                &[("mutual", TlsMode::Mutual), ("off", TlsMode::Off)],
            )
        })
        .unwrap_or_default();
    let tls_off = tls == TlsMode::Off;
    let mut ca_files = None;
    if let Some(ca) = &raw.ca {
        let ca_ref = ca.get_ref();
        let mut paths = Vec::new();
        for (key, value) in [("cert", &ca_ref.cert), ("key", &ca_ref.key)] {
            match value {
                Some(v) if v.get_ref().is_empty() => {
                    ctx.error(v.span(), format!("`ca.{key}` is empty"))
                }
                Some(v) => paths.push(dir.join(v.get_ref())),
                None => ctx.error(ca.span(), format!("`ca` needs `{key}`")),
            }
        }
        if let Ok([cert, key]) = <[PathBuf; 2]>::try_from(paths) {
            ca_files = Some(CaFiles { cert, key });
        }
    }
    let listen = match &raw.listen {
        None => IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
        Some(listen) => {
            match listen.get_ref().parse::<IpAddr>() {
                Ok(ip) => {
                    // The address is advertised to other hosts: "any address" names none.
                    if ip.is_unspecified() && raw.etcd.is_some() {
                        ctx.report(
                        listen.span(),
                        format!(
                            "`listen = \"{ip}\"` cannot be advertised to other hosts with `etcd`"
                        ),
                        Some("set `listen` to this host's address on the network the hosts share".to_owned()),
                    );
                    }
                    ip
                }
                Err(_) => {
                    ctx.error(
                        listen.span(),
                        format!(
                            "invalid `listen` address \"{}\": expected an IP address",
                            listen.get_ref()
                        ),
                    );
                    IpAddr::from(std::net::Ipv4Addr::LOCALHOST)
                }
            }
        }
    };
    let local_path = match &raw.local_path {
        None => LocalPath::default(),
        Some(value) => match value.get_ref().as_str() {
            "in-process" => LocalPath::InProcess,
            "tls" => LocalPath::Tls,
            other => {
                ctx.error(
                    value.span(),
                    format!("invalid `local_path` \"{other}\": expected \"in-process\" or \"tls\""),
                );
                LocalPath::default()
            }
        },
    };
    let access_log = match &raw.access_log {
        None => AccessLog::Off,
        Some(value) => match value.get_ref().as_str() {
            "" => {
                ctx.error(
                    value.span(),
                    "`access_log` is empty: \"off\", \"stdout\" or a file path",
                );
                AccessLog::Off
            }
            "off" => AccessLog::Off,
            "stdout" => AccessLog::Stdout,
            path => AccessLog::File(dir.join(path)),
        },
    };
    let etcd = raw
        .etcd
        .as_ref()
        .map(|etcd| check_etcd(ctx, etcd, &name, tls_off));
    let mut seed = raw.seed.as_ref().and_then(|seed| {
        let n = u64::try_from(*seed.get_ref()).ok();
        if n.is_none() {
            ctx.error(seed.span(), "`seed` must not be negative");
        }
        n
    });
    // `MESH_SEED` overrides the file, so that a run can be repeated (or varied) without
    // editing it.
    if let Some(value) = env.get("MESH_SEED") {
        match value.trim().parse::<u64>() {
            Ok(n) => seed = Some(n),
            Err(_) => ctx.report(
                0..0,
                format!(
                    "`MESH_SEED` in mesh's environment is not a non-negative integer: \"{value}\""
                ),
                Some("unset it, or set it to a number such as `MESH_SEED=42`".to_owned()),
            ),
        }
    }
    Some(MeshSettings {
        name,
        state_dir,
        admin,
        shutdown_timeout,
        seed,
        tls,
        ca: ca_files,
        local_path,
        access_log,
        listen,
        etcd,
    })
}

/// `[mesh] etcd`: every endpoint a URL the etcd client takes, the prefix a key path, the
/// time to live a whole number of seconds etcd can grant.
fn check_etcd(
    ctx: &mut Ctx<'_>,
    etcd: &Spanned<raw::RawEtcd>,
    mesh_name: &str,
    tls_off: bool,
) -> Etcd {
    let raw = etcd.get_ref();
    let mut endpoints = Vec::new();
    match &raw.endpoints {
        Some(list) if list.get_ref().is_empty() => {
            ctx.error(list.span(), "`etcd.endpoints` is empty");
        }
        Some(list) => {
            for endpoint in list.get_ref() {
                match check_etcd_endpoint(endpoint.get_ref()) {
                    Ok(()) => endpoints.push(endpoint.get_ref().clone()),
                    Err(why) => ctx.error(
                        endpoint.span(),
                        format!("invalid etcd endpoint \"{}\": {why}", endpoint.get_ref()),
                    ),
                }
            }
        }
        None => ctx.error(etcd.span(), "`etcd` needs `endpoints`"),
    }
    let prefix = match &raw.prefix {
        Some(prefix) => {
            let text = prefix.get_ref();
            if !text.starts_with('/') {
                ctx.error(prefix.span(), "`etcd.prefix` must start with `/`");
            } else if text.chars().any(char::is_control) {
                ctx.error(prefix.span(), "`etcd.prefix` contains a control character");
            }
            text.clone()
        }
        None => format!("/mesh/{mesh_name}"),
    };
    let default_ttl = secs(10);
    let lease_ttl = match &raw.lease_ttl {
        None => default_ttl,
        Some(value) => match duration(ctx, value, "etcd.lease_ttl") {
            // etcd grants leases in whole seconds.
            Some(ttl) if ttl < secs(1) || ttl.subsec_nanos() != 0 => {
                ctx.error(
                    value.span(),
                    "`etcd.lease_ttl` must be a whole number of seconds, at least 1s (etcd grants leases in seconds)",
                );
                default_ttl
            }
            Some(ttl) => ttl,
            None => default_ttl,
        },
    };
    if tls_off {
        ctx.error(etcd.span(), "`etcd` cannot be used with `tls = \"off\"`");
    }
    Etcd {
        endpoints,
        prefix,
        lease_ttl,
    }
}

/// What the etcd client accepts: `http://HOST[:PORT][/]` (its JSON gateway over plain
/// HTTP; TLS to etcd is not built).
fn check_etcd_endpoint(url: &str) -> Result<(), &'static str> {
    let rest = if let Some(rest) = url.strip_prefix("http://") {
        rest
    } else if url.starts_with("https://") {
        return Err("TLS to etcd is not supported yet: use http://");
    } else {
        return Err("expected http://HOST:PORT");
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err("a path or query is not supported: expected http://HOST:PORT");
    }
    if authority.contains('@') {
        return Err("user information is not supported");
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        // An IPv6 address: `[::1]` or `[::1]:2379`.
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err("an IPv6 address must be closed with `]`");
        };
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("no valid host: expected http://HOST:PORT");
    }
    if let Some(port) = port {
        if port.parse::<u16>().is_err() {
            return Err("the port must be a number from 0 to 65535");
        }
    }
    Ok(())
}

// === values ===

/// Parses a duration: `<n>ms|s|m|h`, or several such as `1m30s`. The error is the reason.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let shape_ok = {
        let mut rest = text;
        let mut ok = !rest.is_empty();
        while ok && !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            rest = &rest[digits..];
            let unit = if rest.starts_with("ms") {
                2
            } else if rest.starts_with(['s', 'm', 'h']) {
                1
            } else {
                0
            };
            ok = digits > 0 && unit > 0;
            rest = &rest[unit.min(rest.len())..];
        }
        ok
    };
    if !shape_ok {
        return Err("expected a number followed by `ms`, `s`, `m` or `h`, such as \"500ms\", \"10s\" or \"1m30s\"".to_owned());
    }
    humantime::parse_duration(text).map_err(|e| e.to_string())
}

fn duration(ctx: &mut Ctx<'_>, value: &Spanned<DurationStr>, key: &str) -> Option<Duration> {
    let written = &value.get_ref().0;
    match parse_duration(written) {
        Ok(d) => Some(d),
        Err(reason) => {
            ctx.error(
                value.span(),
                format!("invalid duration \"{written}\" for `{key}`: {reason}"),
            );
            None
        }
    }
}

/// A duration, or `default` when absent or invalid (the error is reported).
fn duration_or(
    ctx: &mut Ctx<'_>,
    value: Option<&Spanned<DurationStr>>,
    key: &str,
    default: Duration,
) -> Duration {
    value.and_then(|v| duration(ctx, v, key)).unwrap_or(default)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Matches a string against the allowed spellings, suggesting the closest on error.
fn one_of<T: Copy>(
    ctx: &mut Ctx<'_>,
    value: &Spanned<String>,
    key: &str,
    options: &[(&str, T)],
) -> Option<T> {
    let written = value.get_ref();
    if let Some((_, v)) = options.iter().find(|(name, _)| name == written) {
        return Some(*v);
    }
    let names = options
        .iter()
        .map(|(n, _)| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let help =
        suggest(written, options.iter().map(|(n, _)| *n)).map(|s| format!("did you mean `{s}`?"));
    ctx.report(
        value.span(),
        format!("invalid `{key}` \"{written}\": expected one of {names}"),
        help,
    );
    None
}

fn non_empty(ctx: &mut Ctx<'_>, value: Option<&Spanned<String>>, key: &str) -> Option<String> {
    let value = value?;
    if value.get_ref().is_empty() {
        ctx.error(value.span(), format!("`{key}` is empty"));
    }
    Some(value.get_ref().clone())
}

fn at_least(ctx: &mut Ctx<'_>, value: Option<&Spanned<i64>>, min: i64, key: &str) {
    if let Some(v) = value {
        if *v.get_ref() < min {
            ctx.error(v.span(), format!("`{key}` must be at least {min}"));
        }
    }
}

fn percent(ctx: &mut Ctx<'_>, value: Option<(Range<usize>, f64)>, key: &str) {
    if let Some((span, v)) = value {
        if !(0.0..=100.0).contains(&v) {
            ctx.error(span, format!("`{key}` must be between 0 and 100"));
        }
    }
}

/// The candidate closest to `word`, if close enough to be a likely typo.
fn suggest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let normal = |s: &str| s.to_ascii_lowercase().replace('-', "_");
    let mut best: Option<(usize, &str)> = None;
    for candidate in candidates {
        let distance = if normal(word) == normal(candidate) {
            0
        } else {
            strsim::damerau_levenshtein(word, candidate)
        };
        let limit = (candidate.chars().count() / 3).max(1);
        if distance <= limit && best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, c)| c)
}

// === impl Ctx ===

impl Ctx<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.report(span, message, None);
    }

    fn report(&mut self, span: Range<usize>, message: impl Into<String>, help: Option<String>) {
        let (line, col) = line_col(self.text, span.start);
        self.diags.push(Diagnostic {
            path: self.path.to_path_buf(),
            line,
            col,
            message: message.into(),
            help,
        });
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    // Step back to a char boundary so slicing cannot panic on a span inside a character.
    let offset = (0..=offset)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Turn a directory name into a valid mesh name: lowercase, every run of other characters
/// made one `-`, leading characters up to the first letter dropped, at most 63 characters.
/// Empty when nothing is left.
pub(crate) fn normalise_name(dir_name: &str) -> String {
    let mut out = String::new();
    for c in dir_name.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || (c.is_ascii_digit() && !out.is_empty()) {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.truncate(63);
    out.trim_end_matches('-').to_string()
}

#[cfg(test)]
mod name_tests {
    use super::normalise_name;

    #[test]
    fn directory_names_are_normalised() {
        assert_eq!(normalise_name("shop"), "shop");
        assert_eq!(normalise_name("My_Shop.v2"), "my-shop-v2");
        assert_eq!(normalise_name("2fast__4you"), "fast-4you");
        assert_eq!(normalise_name(".tmpAb3"), "tmpab3");
        assert_eq!(normalise_name("___"), "");
        assert_eq!(normalise_name("123"), "");
        assert_eq!(normalise_name(&"a".repeat(80)).len(), 63);
    }
}
