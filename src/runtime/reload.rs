//! Reload (SPEC §4): re-read the file, compute the difference with the running
//! configuration (`config::diff`, a pure function), and apply it: live settings in
//! place, listeners bound or stopped for what was added or removed, replicas started or
//! stopped for `replicas` changes, and rolling replacements for services whose processes
//! must change. An invalid file, or a change that needs a restart, is refused whole
//! before anything is touched.

use std::collections::{BTreeMap, BTreeSet};

use mesh_supervisor::config::{self, Config, Plan};
use mesh_supervisor::supervisor;

use super::{Runtime, Server, Wire, stop_all};

/// What a reload did, for `mesh reload`, SIGHUP and a change of the file.
#[derive(Debug)]
pub(crate) struct ReloadOutcome {
    /// `mesh reload`'s exit code: 0 applied, 78 invalid file, 1 refused ("restart
    /// required") or a replacement failed.
    pub(crate) code: u8,
    /// What to print, one line each (also in the mesh's own log).
    pub(crate) lines: Vec<String>,
}

impl ReloadOutcome {
    fn new(code: u8, lines: Vec<String>) -> Self {
        ReloadOutcome { code, lines }
    }
}

/// Load, validate, diff and apply; every line said is also logged by the mesh.
pub(super) async fn reload(rt: &Runtime) -> ReloadOutcome {
    let logs = &rt.inner.logs;
    let old = rt.config();
    let new = match config::load(&old.path, &rt.inner.base_env) {
        Ok(config) => config,
        Err(errors) => {
            let mut lines = vec![format!(
                "reload refused: {} is invalid; the running configuration is kept",
                old.path.display()
            )];
            lines.extend(errors.to_string().lines().map(str::to_string));
            for line in &lines {
                logs.mesh_line(line);
            }
            return ReloadOutcome::new(78, lines);
        }
    };
    let plan = match config::diff(&old, &new) {
        Ok(plan) => plan,
        Err(refusal) => {
            let line = format!("reload refused: {refusal}; the running configuration is kept");
            logs.mesh_line(&line);
            return ReloadOutcome::new(1, vec![line]);
        }
    };
    if plan.is_empty() {
        let line = "reload: no changes".to_string();
        logs.mesh_line(&line);
        return ReloadOutcome::new(0, vec![line]);
    }
    let mut lines: Vec<String> = plan
        .lines()
        .into_iter()
        .map(|l| format!("reload: {l}"))
        .collect();
    for line in &lines {
        logs.mesh_line(line);
    }
    match apply(rt, &old, new, &plan).await {
        Ok(mut done) => {
            lines.append(&mut done);
            ReloadOutcome::new(0, lines)
        }
        Err(mut failed) => {
            lines.append(&mut failed);
            ReloadOutcome::new(1, lines)
        }
    }
}

/// Apply `plan` (from `old` to `new`). `Err` holds the failures (each also logged): a
/// replacement that failed leaves that service on its previous configuration, the rest
/// of the change applies.
async fn apply(
    rt: &Runtime,
    old: &Config,
    new: Config,
    plan: &Plan,
) -> Result<Vec<String>, Vec<String>> {
    let sup = &rt.inner.supervisor;
    let sidecars = &rt.inner.sidecars;
    let logs = &rt.inner.logs;
    let mut failures = Vec::new();
    let mut done = Vec::new();

    // What runs after the reload: what runs now and is still declared, with everything
    // it reaches (a new upstream is started too), and the services added.
    let running: Vec<String> = old
        .start_order
        .iter()
        .filter(|s| sup.runs(s))
        .cloned()
        .collect();
    let mut wanted: Vec<String> = running
        .iter()
        .filter(|s| new.services.contains_key(*s))
        .cloned()
        .collect();
    wanted.extend(plan.added.iter().cloned());
    let selected = supervisor::selected(&new, Some(&wanted));
    let to_start: Vec<String> = selected
        .iter()
        .filter(|s| !running.contains(s))
        .cloned()
        .collect();
    let to_remove: Vec<String> = running
        .iter()
        .filter(|s| !selected.contains(s))
        .cloned()
        .collect();

    let test = !sidecars.wiring.lock().test_ingresses.is_empty();
    let wire = Wire {
        config: &new,
        sidecars,
        certs: rt.inner.certs.as_deref(),
        test,
    };
    let say = |line: String, failures: &mut Vec<String>| {
        logs.mesh_line(&line);
        failures.push(line);
    };
    if let Err(e) = wire.callers(&selected) {
        say(format!("reload: {e:#}"), &mut failures);
        return Err(failures);
    }
    // Who is admitted and the rate limits: in place, for every inbound.
    wire.policies();

    // Outbounds and ingresses: refreshed where the called service's traffic or routes
    // changed, bound where new.
    let changed_policy: BTreeSet<&str> = plan
        .live
        .iter()
        .filter(|c| c.keys.iter().any(|k| matches!(*k, "traffic" | "routes")))
        .map(|c| c.service.as_str())
        .chain(plan.replace.iter().map(|r| r.service.as_str()))
        .collect();
    let seed_changed = plan.mesh.contains(&"seed");
    let affects = |service: &str| {
        seed_changed
            || changed_policy.contains(service)
            || new.services[service]
                .routes
                .iter()
                .flat_map(|r| r.backends.iter())
                .any(|(b, _)| changed_policy.contains(b.as_str()))
    };
    for caller in &selected {
        // A service of other hosts calls from there (SPEC §9): no outbound here.
        let calls_here = !new.services[caller].is_remote();
        for upstream in new.services[caller].upstreams.iter().filter(|_| calls_here) {
            let key = (caller.clone(), upstream.clone());
            let exists = sidecars.wiring.lock().outbounds.contains_key(&key);
            if !exists {
                if let Err(e) = wire.outbound(caller, upstream).await {
                    say(format!("reload: {e:#}"), &mut failures);
                }
            } else if affects(upstream) {
                // Taken out of the lock: building the settings takes it too.
                let setup = sidecars
                    .wiring
                    .lock()
                    .outbounds
                    .get(&key)
                    .map(|o| o.setup.clone());
                if let Some(setup) = setup {
                    wire.refresh(&setup, caller, upstream, false);
                }
            }
        }
        let old_expose = old.services.get(caller).and_then(|s| s.expose);
        let new_expose = new.services[caller].expose;
        let bound = sidecars.wiring.lock().ingresses.contains_key(caller);
        if bound && old_expose == new_expose && new_expose.is_some() {
            if affects(caller) {
                let setup = sidecars
                    .wiring
                    .lock()
                    .ingresses
                    .get(caller)
                    .map(|o| o.setup.clone());
                if let Some(setup) = setup {
                    wire.refresh(&setup, super::INGRESS, caller, true);
                }
            }
        } else if bound || new_expose.is_some() {
            let stopped = sidecars.wiring.lock().ingresses.remove(caller);
            if let Some(ingress) = stopped {
                stop_all(vec![ingress.server]).await;
            }
            if new_expose.is_some() {
                match wire.ingress(caller).await {
                    Ok(addr) => {
                        let line = format!("ingress of `{caller}` on {addr}");
                        logs.mesh_line(&line);
                        done.push(line);
                    }
                    Err(e) => say(format!("reload: {e:#}"), &mut failures),
                }
            }
        }
    }

    // The configuration the supervisor builds environments and new processes from:
    // the new one, with the outbound addresses as bound now.
    let upstream_addrs: BTreeMap<(String, String), std::net::SocketAddr> = sidecars
        .wiring
        .lock()
        .outbounds
        .iter()
        .map(|(k, o)| (k.clone(), o.addr))
        .collect();
    let mut in_force = new.clone();
    sup.set_config(in_force.clone(), upstream_addrs.clone());

    // Added services: inbounds first, then their replicas.
    for service in &to_start {
        let svc = &new.services[service];
        if let Err(e) = start_replicas(rt, &wire, svc, 0..svc.replicas).await {
            say(format!("reload: {e}"), &mut failures);
        }
    }

    // `replicas` lowered: only the highest indices stop.
    for scale in &plan.scale {
        if scale.to < scale.from
            && running.contains(&scale.service)
            && selected.contains(&scale.service)
        {
            stop_replicas(rt, &scale.service, scale.stopping()).await;
        }
    }

    // Settings that apply to running processes. A service that is also replaced gets
    // them with its new processes: its old ones keep their whole configuration, which
    // stays in force if the replacement fails (SPEC §4).
    for change in &plan.live {
        let replaced = plan.replace.iter().any(|r| r.service == change.service);
        if running.contains(&change.service) && selected.contains(&change.service) && !replaced {
            sup.update_service(&new.services[&change.service]);
        }
    }

    // Rolling replacements, one service after the other.
    let mut kept_old: BTreeSet<String> = BTreeSet::new();
    for replacement in &plan.replace {
        let service = &replacement.service;
        // A service that now runs on other hosts only has had its replicas stopped by
        // the scale-down above: nothing is left to replace.
        if !running.contains(service)
            || !selected.contains(service)
            || new.services[service].is_remote()
        {
            continue;
        }
        match sup.replace_service(&new.services[service]).await {
            Ok(()) => done.push(format!("{service}: replaced")),
            Err(line) => {
                // The service stays on its previous configuration; the next reload,
                // restart or watched change tries again.
                kept_old.insert(service.clone());
                if let Some(previous) = old.services.get(service) {
                    in_force.services.insert(service.clone(), previous.clone());
                }
                failures.push(line);
            }
        }
    }
    if !kept_old.is_empty() {
        sup.set_config(in_force.clone(), upstream_addrs);
    }

    // `replicas` raised: only the new highest indices start, after the replacements so
    // that they are not replaced again.
    for scale in &plan.scale {
        if scale.to > scale.from
            && running.contains(&scale.service)
            && selected.contains(&scale.service)
        {
            let svc = &in_force.services[&scale.service];
            if let Err(e) = start_replicas(rt, &wire, svc, scale.starting()).await {
                say(format!("reload: {e}"), &mut failures);
            }
        }
    }

    // Outbounds no process uses any more: upstreams removed from callers that were
    // replaced.
    let unused: Vec<Server> = {
        let mut wiring = sidecars.wiring.lock();
        let keys: Vec<(String, String)> = wiring
            .outbounds
            .keys()
            .filter(|(caller, upstream)| {
                !kept_old.contains(caller)
                    && (!selected.contains(caller)
                        || in_force.services[caller].is_remote()
                        || !in_force.services[caller].upstreams.contains(upstream))
                    && !to_remove.contains(caller)
            })
            .cloned()
            .collect();
        keys.iter()
            .filter_map(|k| wiring.outbounds.remove(k))
            .map(|o| o.server)
            .collect()
    };
    stop_all(unused).await;

    // Removed services: out of discovery, processes stopped, listeners closed.
    for service in &to_remove {
        let replicas = old.services.get(service).map_or(0, |s| s.replicas);
        sidecars.draining.lock().insert(service.clone());
        sidecars.registry.set(service, Vec::new());
        stop_replicas(rt, service, 0..replicas).await;
        let servers: Vec<Server> = {
            let mut wiring = sidecars.wiring.lock();
            let keys: Vec<(String, String)> = wiring
                .outbounds
                .keys()
                .filter(|(caller, _)| caller == service)
                .cloned()
                .collect();
            let mut servers: Vec<Server> = keys
                .iter()
                .filter_map(|k| wiring.outbounds.remove(k))
                .map(|o| o.server)
                .collect();
            servers.extend(wiring.ingresses.remove(service).map(|o| o.server));
            servers
        };
        stop_all(servers).await;
        sidecars.draining.lock().remove(service);
        done.push(format!("{service}: removed"));
    }
    sidecars.rewired.send_replace(());

    if failures.is_empty() {
        Ok(done)
    } else {
        Err(failures)
    }
}

/// Bind the inbounds of replicas `indices` of `svc`, then start them.
async fn start_replicas(
    rt: &Runtime,
    wire: &Wire<'_>,
    svc: &config::Service,
    indices: std::ops::Range<u32>,
) -> Result<(), String> {
    let sup = &rt.inner.supervisor;
    let ports = sup
        .allocate(svc, indices.clone())
        .map_err(|e| format!("cannot allocate ports for `{}`: {e}", svc.name))?;
    for ((service, replica), port) in &ports {
        if let Some(port) = port {
            wire.inbound(service, *replica, *port)
                .await
                .map_err(|e| format!("{e:#}"))?;
        }
    }
    sup.add_replicas(svc, indices, &ports);
    Ok(())
}

/// Stop replicas `indices` of `service` (each leaves discovery first), then close their
/// inbounds.
async fn stop_replicas(rt: &Runtime, service: &str, indices: std::ops::Range<u32>) {
    rt.inner
        .supervisor
        .remove_replicas(service, indices.clone())
        .await;
    if let Some(certs) = &rt.inner.certs {
        for i in indices.clone() {
            certs.forget(service, i);
        }
    }
    let servers: Vec<Server> = {
        let mut wiring = rt.inner.sidecars.wiring.lock();
        indices
            .filter_map(|i| wiring.inbounds.remove(&(service.to_string(), i)))
            .map(|i| i.server)
            .collect()
    };
    rt.inner.sidecars.rewired.send_replace(());
    stop_all(servers).await;
}
