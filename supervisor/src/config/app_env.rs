//! What an application is given at each start (SPEC §2): its environment, and its
//! `command` / health check words with `${}` expanded.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::interpolate::{self, InterpolateError};
use super::{Config, PortSpec, Protocol, Service, envfile};

/// Variables of mesh's own environment that belong to mesh, not to its children: systemd's
/// notify and watchdog protocol, and socket activation (`LISTEN_FDS`, `LISTEN_PID`, …).
const NOT_INHERITED: &[&str] = &["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

impl Service {
    /// The complete environment of one replica of this service, sorted by name.
    ///
    /// `base_env` (mesh's own environment, minus the variables that belong to mesh itself)
    /// is overlaid by `env_file` (read now), then `env`, then the table: `PORT` (when
    /// `port` is given), `MESH_SERVICE`, `MESH_REPLICA`, `MESH_NAME`, and `<UP>_URL`
    /// (http and grpc upstreams) and `<UP>_ADDR` for each upstream, whose outbound
    /// listener addresses are in `upstream_addrs`. `config` is the configuration this
    /// service belongs to: it gives the mesh name and the upstreams' protocols.
    ///
    /// `${NAME}` in `env_file` and `env` values is expanded against the table and
    /// `base_env`, never against other `env` keys. Errors are one line, for the log.
    pub fn app_env(
        &self,
        config: &Config,
        replica: u32,
        port: Option<u16>,
        upstream_addrs: &BTreeMap<String, SocketAddr>,
        base_env: &BTreeMap<String, String>,
    ) -> Result<Vec<(String, String)>, String> {
        let table = self.table_vars(config, replica, port, upstream_addrs)?;
        let lookup = |name: &str| table.get(name).or_else(|| base_env.get(name)).cloned();

        let mut out: BTreeMap<String, String> = base_env
            .iter()
            .filter(|(k, _)| !NOT_INHERITED.contains(&k.as_str()) && !k.starts_with("LISTEN_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(path) = &self.env_file {
            let shown = path.display();
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read env_file {shown}: {e}"))?;
            let entries =
                envfile::parse(&text).map_err(|e| format!("invalid env_file {shown}: {e}"))?;
            for entry in entries {
                let value = if entry.literal {
                    entry.value
                } else {
                    interpolate::expand(&entry.value, &lookup)
                        .map_err(|e| format!("in env_file {shown} line {}: {e}", entry.line))?
                };
                out.insert(entry.key, value);
            }
        }
        for (key, value) in &self.env {
            let value =
                interpolate::expand(value, &lookup).map_err(|e| format!("in `env.{key}`: {e}"))?;
            out.insert(key.clone(), value);
        }
        out.extend(table);
        Ok(out.into_iter().collect())
    }

    /// Expands `${}` in `words` (a `command`, `health.exec` or `[health.http]`) against
    /// an environment built by [`Service::app_env`]; see [`expand_words`].
    pub fn expand_words(words: &[String], env: &[(String, String)]) -> Result<Vec<String>, String> {
        expand_words(words, env)
    }

    /// The variables mesh sets for this replica.
    fn table_vars(
        &self,
        config: &Config,
        replica: u32,
        port: Option<u16>,
        upstream_addrs: &BTreeMap<String, SocketAddr>,
    ) -> Result<BTreeMap<String, String>, String> {
        let mut table = BTreeMap::new();
        if let (Some(port), false) = (port, self.port == PortSpec::None) {
            table.insert("PORT".to_owned(), port.to_string());
        }
        table.insert("MESH_SERVICE".to_owned(), self.name.clone());
        table.insert("MESH_REPLICA".to_owned(), replica.to_string());
        table.insert("MESH_NAME".to_owned(), config.mesh.name.clone());
        for upstream in &self.upstreams {
            let addr = upstream_addrs
                .get(upstream)
                .ok_or_else(|| format!("no outbound address for upstream `{upstream}`"))?;
            let stem = Service::upstream_var_stem(upstream);
            let protocol = config.services.get(upstream).map(|s| s.protocol);
            if matches!(protocol, Some(Protocol::Http | Protocol::Grpc)) {
                table.insert(format!("{stem}_URL"), format!("http://{addr}"));
            }
            table.insert(format!("{stem}_ADDR"), addr.to_string());
        }
        Ok(table)
    }
}

/// Expands `${}` in each of `words` against `env` (the last entry of a name wins), as
/// done for `command`, `health.exec` and `health.http` at each start. Words are expanded
/// after splitting, so a value with spaces stays one argument.
pub fn expand_words(words: &[String], env: &[(String, String)]) -> Result<Vec<String>, String> {
    let lookup = |name: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    words
        .iter()
        .map(|word| interpolate::expand(word, &lookup).map_err(|e: InterpolateError| e.to_string()))
        .collect()
}
