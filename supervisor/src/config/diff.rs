//! Reload: what changed between the running configuration and a new one, as a plan of
//! actions (SPEC §4 "Reload").
//!
//! [`diff`] is pure: two validated [`Config`]s in, a [`Plan`] or a [`Refusal`] out, with
//! no I/O and no processes. The supervisor and the runtime carry the plan out, the way
//! systemd's `daemon-reload` and Kubernetes' Deployment controller separate "what
//! changed" from "do it".
//!
//! Every key has exactly one rule, in `MESH_RULES` and `SERVICE_RULES`, which read
//! like SPEC §4. A field added to [`MeshSettings`] or [`Service`] without a rule does not
//! compile (the destructuring below the rules), so reload cannot silently ignore a key.

use std::fmt;
use std::ops::Range;

use super::{Config, MeshSettings, Service};

/// Compares the running configuration `old` with `new`.
///
/// A change that only a restart of `mesh` can apply refuses the whole reload, listing
/// every such key: `[mesh]` `name`, `state_dir`, `admin`, `tls`, `ca`, `local_path`,
/// `access_log`, `listen` and `etcd`, and a service's
/// `protocol`. Otherwise the plan says, per service, what to replace, what to apply live
/// and what to scale; an empty plan means there is nothing to do.
pub fn diff(old: &Config, new: &Config) -> Result<Plan, Refusal> {
    let mut plan = Plan::default();
    let mut refused = Vec::new();

    for rule in MESH_RULES {
        if (rule.changed)(&old.mesh, &new.mesh) {
            match rule.effect {
                MeshEffect::Live => plan.mesh.push(rule.key),
                MeshEffect::Restart => refused.push(RestartKey::Mesh(rule.key)),
            }
        }
    }

    for name in in_start_order(new) {
        let Some(new_svc) = new.services.get(name) else {
            continue;
        };
        let Some(old_svc) = old.services.get(name) else {
            plan.added.push(name.clone());
            continue;
        };
        let mut replace = Vec::new();
        let mut live = Vec::new();
        // A service that moves between this host and the others (SPEC §9: its `command`
        // removed or added) keeps no process across the change: its replicas here are
        // stopped, or started, by the `replicas` change alone.
        let moved = old_svc.is_remote() != new_svc.is_remote();
        for rule in SERVICE_RULES {
            if !(rule.changed)(old_svc, new_svc) {
                continue;
            }
            match rule.effect {
                Effect::Replace if moved => {}
                Effect::Replace => replace.push(rule.key),
                Effect::Live => live.push(rule.key),
                Effect::Scale => plan.scale.push(Scale {
                    service: name.clone(),
                    from: old_svc.replicas,
                    to: new_svc.replicas,
                }),
                Effect::Restart => refused.push(RestartKey::Service {
                    service: name.clone(),
                    key: rule.key,
                }),
            }
        }
        if !replace.is_empty() {
            plan.replace.push(Replacement {
                service: name.clone(),
                keys: replace,
                replicas: old_svc.replicas.min(new_svc.replicas),
            });
        }
        if !live.is_empty() {
            plan.live.push(ServiceChange {
                service: name.clone(),
                keys: live,
            });
        }
    }

    let mut removed: Vec<String> = in_start_order(old)
        .filter(|name| !new.services.contains_key(*name))
        .cloned()
        .collect();
    removed.reverse();
    plan.removed = removed;

    if refused.is_empty() {
        Ok(plan)
    } else {
        Err(Refusal::RestartRequired { keys: refused })
    }
}

/// What a reload does, per key that changed. Each list follows the new configuration's
/// start order (`removed`: the old one's, backwards), so carrying it out in order starts
/// dependencies first and stops dependents first.
///
/// A service can be in several lists: `env` and `traffic` changed puts it in `replace`
/// and in `live`; `replicas` and `env` changed puts it in `scale` and `replace`, and then
/// only the replicas that remain are replaced while those above the new count are stopped
/// (or, scaling up, the new ones start with the new configuration).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// `[mesh]` keys that changed and apply without a restart (`shutdown_timeout`,
    /// `seed`).
    pub mesh: Vec<&'static str>,
    /// Services only in the new configuration, to start.
    pub added: Vec<String>,
    /// Services only in the running configuration, to stop.
    pub removed: Vec<String>,
    /// Services whose processes must be replaced: one replica at a time, each new one
    /// ready before the old one stops (SPEC §4, "A replacement that fails keeps the old
    /// replica").
    pub replace: Vec<Replacement>,
    /// Services with changes that apply without restarting their processes.
    pub live: Vec<ServiceChange>,
    /// Services whose `replicas` changed: only the highest indices start or stop.
    pub scale: Vec<Scale>,
}

/// A service whose changed keys apply live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceChange {
    pub service: String,
    /// The keys that changed, in the order of SPEC §3 (`traffic`, `routes`, …).
    pub keys: Vec<&'static str>,
}

/// A service whose replicas are replaced one at a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replacement {
    pub service: String,
    /// The keys that changed (`command`, `env`, `env_file`, …).
    pub keys: Vec<&'static str>,
    /// How many running replicas are replaced: indices `0..replicas`, those that remain
    /// after a scale down (the lower of the old and new `replicas`).
    pub replicas: u32,
}

/// A change of `replicas`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scale {
    pub service: String,
    pub from: u32,
    pub to: u32,
}

/// Why a new configuration is not applied: the running mesh keeps its configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Keys that only stopping and starting `mesh` applies (SPEC §4), every one that
    /// changed.
    #[error("restart required: {} changed{}", list(.keys), protocol_note(.keys))]
    RestartRequired { keys: Vec<RestartKey> },
}

/// A key whose change needs `mesh` to be restarted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestartKey {
    /// A `[mesh]` key: `name` (every identity and `MESH_NAME`), `state_dir` (held locked,
    /// with the CA and the control socket), `admin` (its listener), `tls` or `ca` (every
    /// sidecar's identity and trust), `listen` (every inbound's address, this host's name
    /// in etcd) or `etcd` (the registration and the watch).
    Mesh(&'static str),
    /// A service's key; only `protocol`, which decides the kind of the service's inbound
    /// and of every caller's outbound to it, and which callers get `<UP>_URL`.
    Service { service: String, key: &'static str },
}

// === the rules ===

/// What a changed key of a service takes (SPEC §4 "Reload").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Effect {
    /// Replace the replicas one at a time: what a process is given changed.
    Replace,
    /// Apply without restarting processes.
    Live,
    /// Start or stop the highest indices.
    Scale,
    /// Refuse the reload: only a restart applies it.
    Restart,
}

/// What a changed `[mesh]` key takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MeshEffect {
    Live,
    Restart,
}

/// One key: its name, what its change takes, and whether it changed.
struct Rule<T, E> {
    key: &'static str,
    effect: E,
    changed: fn(&T, &T) -> bool,
}

/// A rule for a field compared with `!=`, named after the field.
macro_rules! rule {
    ($effect:expr, $field:ident) => {
        Rule {
            key: stringify!($field),
            effect: $effect,
            changed: |a, b| a.$field != b.$field,
        }
    };
}

/// `[mesh]`.
const MESH_RULES: &[Rule<MeshSettings, MeshEffect>] = &[
    rule!(MeshEffect::Restart, name),
    rule!(MeshEffect::Restart, state_dir),
    rule!(MeshEffect::Restart, admin),
    rule!(MeshEffect::Restart, tls),
    rule!(MeshEffect::Restart, ca),
    // Which path every outbound takes to the inbounds of this process.
    rule!(MeshEffect::Restart, local_path),
    rule!(MeshEffect::Restart, access_log),
    // Where every inbound is bound, and this host's name in etcd.
    rule!(MeshEffect::Restart, listen),
    // The lease and the watch this host's registration and discovery hold.
    rule!(MeshEffect::Restart, etcd),
    rule!(MeshEffect::Live, shutdown_timeout),
    rule!(MeshEffect::Live, seed),
];

/// `[services.NAME]`, in the order of SPEC §3.
const SERVICE_RULES: &[Rule<Service, Effect>] = &[
    rule!(Effect::Replace, command),
    rule!(Effect::Replace, working_dir),
    rule!(Effect::Replace, env),
    // The path, or what the file sets (SPEC §4: "path or contents").
    Rule {
        key: "env_file",
        effect: Effect::Replace,
        changed: |a, b| a.env_file != b.env_file || a.env_file_digest != b.env_file_digest,
    },
    rule!(Effect::Replace, user),
    rule!(Effect::Replace, group),
    rule!(Effect::Scale, replicas),
    rule!(Effect::Restart, protocol),
    rule!(Effect::Replace, port),
    rule!(Effect::Live, expose),
    rule!(Effect::Replace, upstreams),
    rule!(Effect::Live, depends_on),
    rule!(Effect::Live, restart),
    rule!(Effect::Live, backoff),
    rule!(Effect::Live, start_limit),
    rule!(Effect::Live, stop_signal),
    rule!(Effect::Live, stop_timeout),
    rule!(Effect::Live, watch),
    rule!(Effect::Live, ready_timeout),
    rule!(Effect::Live, allow),
    rule!(Effect::Live, health),
    rule!(Effect::Live, traffic),
    rule!(Effect::Live, routes),
];

/// Does not compile when a field is added to the model without a rule above: add the
/// rule, then the field here. Fields that are not keys say why they need no rule.
const _EVERY_FIELD_HAS_A_RULE: fn(&Config) = |config| {
    let Config {
        // Reload re-reads the same file; every relative path in it is already resolved
        // into the fields compared.
        path: _,
        dir: _,
        mesh,
        services,
        // Derived from `depends_on`, `upstreams` and routes, which have rules.
        start_order: _,
    } = config;
    let MeshSettings {
        name: _,
        state_dir: _,
        admin: _,
        shutdown_timeout: _,
        seed: _,
        tls: _,
        ca: _,
        local_path: _,
        access_log: _,
        listen: _,
        etcd: _,
    } = mesh;
    for service in services.values() {
        let Service {
            // The key of `services`: a rename is a removal and an addition.
            name: _,
            command: _,
            working_dir: _,
            env: _,
            env_file: _,
            env_file_digest: _,
            user: _,
            group: _,
            replicas: _,
            protocol: _,
            port: _,
            upstreams: _,
            allow: _,
            depends_on: _,
            restart: _,
            backoff: _,
            start_limit: _,
            stop_signal: _,
            stop_timeout: _,
            watch: _,
            ready_timeout: _,
            health: _,
            expose: _,
            traffic: _,
            routes: _,
        } = service;
    }
};

/// Every service of `config` in start order, then any that the order lacks (there are
/// none in a validated configuration; this keeps a plan whole regardless).
fn in_start_order(config: &Config) -> impl Iterator<Item = &String> {
    let rest = config
        .services
        .keys()
        .filter(|name| !config.start_order.contains(name));
    config.start_order.iter().chain(rest)
}

/// `a`, `a and b`, `a, b and c`.
fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

fn list(keys: &[RestartKey]) -> String {
    let items: Vec<String> = keys.iter().map(ToString::to_string).collect();
    join_and(&items)
}

fn protocol_note(keys: &[RestartKey]) -> &'static str {
    let protocol = keys.iter().any(|k| {
        matches!(
            k,
            RestartKey::Service {
                key: "protocol",
                ..
            }
        )
    });
    if protocol {
        " (a service's protocol decides the kind of its sidecars)"
    } else {
        ""
    }
}

// === impl Plan ===

impl Plan {
    /// Whether the new configuration changes nothing.
    pub fn is_empty(&self) -> bool {
        let Plan {
            mesh,
            added,
            removed,
            replace,
            live,
            scale,
        } = self;
        mesh.is_empty()
            && added.is_empty()
            && removed.is_empty()
            && replace.is_empty()
            && live.is_empty()
            && scale.is_empty()
    }

    /// One line per change, for the mesh log and `mesh reload`, which put them after
    /// `reload: ` (`api: env changed: replacing 2 replicas one at a time`). `[mesh]`
    /// first, then removed and added services, replacements, scaling, and live changes.
    /// None for an empty plan.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.mesh.is_empty() {
            out.push(format!("[mesh] {} changed: applied", self.mesh.join(", ")));
        }
        for name in &self.removed {
            out.push(format!("{name}: removed: stopping it"));
        }
        for name in &self.added {
            out.push(format!("{name}: added: starting it"));
        }
        for r in &self.replace {
            let how = match r.replicas {
                1 => "replacing its replica".to_owned(),
                n => format!("replacing {n} replicas one at a time"),
            };
            out.push(format!(
                "{}: {} changed: {how}",
                r.service,
                r.keys.join(", ")
            ));
        }
        for s in &self.scale {
            let (verb, indices) = if s.to > s.from {
                ("starting", s.starting())
            } else {
                ("stopping", s.stopping())
            };
            let replicas: Vec<String> = indices.map(|i| format!("{}.{i}", s.service)).collect();
            // Only a service of other hosts has 0 replicas (SPEC §9).
            let change = match (s.from, s.to) {
                (_, 0) => "now runs on other hosts only".to_owned(),
                (0, _) => "now runs here too".to_owned(),
                (from, to) => format!("replicas {from} -> {to}"),
            };
            out.push(format!(
                "{}: {change}: {verb} {}",
                s.service,
                replicas.join(", ")
            ));
        }
        for c in &self.live {
            out.push(format!(
                "{}: {} changed: applied without restarting its processes",
                c.service,
                c.keys.join(", ")
            ));
        }
        out
    }
}

impl fmt::Display for Plan {
    /// [`Plan::lines`], one per line; `no changes` for an empty plan.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no changes");
        }
        f.write_str(&self.lines().join("\n"))
    }
}

// === impl Scale ===

impl Scale {
    /// The replica indices to start (empty when scaling down).
    pub fn starting(&self) -> Range<u32> {
        self.from..self.to.max(self.from)
    }

    /// The replica indices to stop (empty when scaling up).
    pub fn stopping(&self) -> Range<u32> {
        self.to..self.from.max(self.to)
    }
}

// === impl RestartKey ===

impl fmt::Display for RestartKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestartKey::Mesh(key) => write!(f, "`[mesh] {key}`"),
            RestartKey::Service { service, key } => write!(f, "`{key}` of service `{service}`"),
        }
    }
}

#[cfg(test)]
mod tests;
