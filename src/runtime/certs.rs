//! The identities of a running mesh (SPEC §8): the mesh CA, a leaf per replica's inbound,
//! a leaf per calling service's outbounds and one for the ingresses, each renewed at half
//! its lifetime; and who each inbound admits (SPEC §1, §3 `allow`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use mesh_proxy as proxy;
use mesh_supervisor::config::Config;
use parking_lot::Mutex;
use proxy::metrics::Metrics;
use proxy::tls::{self, Ca, ClientTls, Identity};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// The environment variable that shortens leaf lifetimes, for tests and debugging only
/// (e.g. `MESH_CERT_LIFETIME=4s` renews every 2 s). Not part of the product contract.
pub(crate) const LIFETIME_VAR: &str = "MESH_CERT_LIFETIME";

/// What `mesh certs` shows: the CA and every leaf in use now.
#[derive(Clone, Debug)]
pub(crate) struct CertsReport {
    /// SHA-256 of the CA certificate's DER, as `AB:CD:…` (`openssl x509 -fingerprint
    /// -sha256`).
    pub(crate) ca_fingerprint: String,
    /// The CA's subject: the issuer of every leaf.
    pub(crate) issuer: String,
    pub(crate) ca_not_after: SystemTime,
    /// Inbound leaves by service and replica, then the callers' outbound leaves.
    pub(crate) leaves: Vec<LeafReport>,
}

/// One leaf in use.
#[derive(Clone, Debug)]
pub(crate) struct LeafReport {
    /// The service (or `ingress` for the ingresses' identity).
    pub(crate) service: String,
    /// The replica whose inbound presents it; `None` for the leaf the service's outbounds
    /// (or the ingresses) present when calling.
    pub(crate) replica: Option<u32>,
    /// `spiffe://<mesh>/<service>`.
    pub(crate) identity: String,
    /// Upper-case hex.
    pub(crate) serial: String,
    pub(crate) not_after: SystemTime,
}

impl std::fmt::Display for CertsReport {
    /// A table, as `mesh certs` prints it: the CA, then one line per leaf.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "CA  {}", self.issuer)?;
        writeln!(f, "    sha256 {}", self.ca_fingerprint)?;
        writeln!(
            f,
            "    not after {}",
            humantime::format_rfc3339_seconds(self.ca_not_after)
        )?;
        writeln!(f, "leaves issued by the CA above:")?;
        writeln!(
            f,
            "{:<24} {:<8} {:<40} {:<32} NOT AFTER",
            "SERVICE", "REPLICA", "IDENTITY", "SERIAL"
        )?;
        for leaf in &self.leaves {
            let replica = leaf
                .replica
                .map_or_else(|| "callers".to_string(), |r| r.to_string());
            writeln!(
                f,
                "{:<24} {:<8} {:<40} {:<32} {}",
                leaf.service,
                replica,
                leaf.identity,
                leaf.serial,
                humantime::format_rfc3339_seconds(leaf.not_after)
            )?;
        }
        Ok(())
    }
}

/// The CA and every identity issued, with their renewal tasks.
pub(super) struct Certs {
    ca: Arc<Ca>,
    mesh_name: String,
    lifetime: Duration,
    metrics: Metrics,
    issued: Mutex<Vec<Issued>>,
    /// Cancelled at shutdown: renewal tasks end.
    renewals: CancellationToken,
}

struct Issued {
    service: String,
    replica: Option<u32>,
    identity: Arc<Identity>,
}

impl Certs {
    /// Load the CA named in `[mesh] ca`, or the state directory's (created at the first
    /// start). Fails with the file at fault; never creates a CA in place of a broken one.
    pub(super) fn load(
        config: &Config,
        base_env: &BTreeMap<String, String>,
        metrics: &Metrics,
    ) -> anyhow::Result<Certs> {
        let lifetime = match base_env.get(LIFETIME_VAR) {
            None => tls::DEFAULT_LEAF_LIFETIME,
            Some(text) => humantime::parse_duration(text)
                .ok()
                .filter(|d| *d >= Duration::from_secs(1))
                .with_context(|| {
                    format!("invalid {LIFETIME_VAR} \"{text}\": expected a duration of at least 1s")
                })?,
        };
        let mesh = &config.mesh;
        let ca = match &mesh.ca {
            Some(files) => Ca::load(&files.cert, &files.key),
            None => Ca::load_or_create(&mesh.state_dir, &mesh.name),
        }
        .context("cannot load the mesh CA")?;
        if ca.not_after() <= SystemTime::now() {
            let cert = match &mesh.ca {
                Some(files) => files.cert.clone(),
                None => mesh.state_dir.join("ca.crt"),
            };
            anyhow::bail!(
                "the mesh CA {} expired at {}: replace it (see docs/tls.md)",
                cert.display(),
                humantime::format_rfc3339_seconds(ca.not_after())
            );
        }
        // SPEC §8: warn 30 days ahead (`/ready` and `STATUS=` repeat it where built).
        let soon = SystemTime::now() + Duration::from_secs(30 * 24 * 3600);
        if ca.not_after() <= soon {
            tracing::warn!(
                not_after = %humantime::format_rfc3339_seconds(ca.not_after()),
                "the mesh CA expires within 30 days: replace it before then (see docs/tls.md)"
            );
        }
        Ok(Certs {
            ca: Arc::new(ca),
            mesh_name: mesh.name.clone(),
            lifetime,
            metrics: metrics.clone(),
            issued: Mutex::new(Vec::new()),
            renewals: CancellationToken::new(),
        })
    }

    /// The server configuration of the inbound of `service.replica`, with a new leaf
    /// renewed in the background; ALPN `h2` + `http/1.1`, or none for tcp.
    pub(super) fn inbound(
        &self,
        service: &str,
        replica: u32,
        tcp: bool,
    ) -> anyhow::Result<Arc<tls::ServerConfig>> {
        let identity = self.issue(service, Some(replica))?;
        let alpn = if tcp { &[][..] } else { tls::ALPN_INBOUND_HTTP };
        tls::server_config(&self.ca, identity, alpn)
            .with_context(|| format!("cannot configure tls for the inbound of {service}.{replica}"))
    }

    /// The client configurations of caller `name` (a service, or `ingress`), with a new
    /// leaf renewed in the background.
    pub(super) fn caller(&self, name: &str) -> anyhow::Result<ClientTls> {
        let identity = self.issue(name, None)?;
        ClientTls::new(&self.ca, &identity)
            .with_context(|| format!("cannot configure tls for the outbounds of `{name}`"))
    }

    /// The CA and every leaf presented now.
    pub(super) fn report(&self) -> CertsReport {
        let leaves = self
            .issued
            .lock()
            .iter()
            .map(|issued| {
                let (serial, not_after) = issued.identity.current();
                LeafReport {
                    service: issued.service.clone(),
                    replica: issued.replica,
                    identity: issued.identity.identity(),
                    serial,
                    not_after,
                }
            })
            .collect();
        CertsReport {
            ca_fingerprint: self.ca.fingerprint_sha256(),
            issuer: self.ca.subject(),
            ca_not_after: self.ca.not_after(),
            leaves,
        }
    }

    /// Forget the leaf of `service.replica` (a reload removed the replica): `mesh certs`
    /// lists only what is in use.
    pub(super) fn forget(&self, service: &str, replica: u32) {
        self.issued
            .lock()
            .retain(|i| !(i.service == service && i.replica == Some(replica)));
    }

    /// Stop renewing.
    pub(super) fn stop(&self) {
        self.renewals.cancel();
    }

    fn issue(&self, service: &str, replica: Option<u32>) -> anyhow::Result<Arc<Identity>> {
        let leaf = self
            .ca
            .issue(&self.mesh_name, service, self.lifetime)
            .with_context(|| format!("cannot issue the certificate of `{service}`"))?;
        let expiry = {
            let metrics = self.metrics.clone();
            let service = service.to_string();
            move |not_after: SystemTime| {
                if let Some(replica) = replica {
                    metrics.set_cert_expiry(&service, replica, unix_secs(not_after));
                }
            }
        };
        expiry(leaf.not_after);
        let identity = Arc::new(Identity::new(leaf));
        let ca = Arc::clone(&self.ca);
        let (mesh_name, name, lifetime) =
            (self.mesh_name.clone(), service.to_string(), self.lifetime);
        let span = tracing::info_span!("renewal", service = %service, replica);
        tokio::spawn(
            tls::renew(
                Arc::clone(&identity),
                lifetime,
                move || ca.issue(&mesh_name, &name, lifetime),
                move |leaf| expiry(leaf.not_after),
                self.renewals.clone(),
            )
            .instrument(span),
        );
        self.issued.lock().push(Issued {
            service: service.to_string(),
            replica,
            identity: Arc::clone(&identity),
        });
        Ok(identity)
    }
}

/// Who each service's inbounds admit (SPEC §1, §3): the services that list it in their
/// `upstreams`, the ones its `allow` names, `ingress` when it is exposed, and whoever is
/// admitted to a service whose routes name it as a backend
/// ([`Config::admitted_callers`]).
pub(super) fn admitted(config: &Config) -> BTreeMap<String, BTreeSet<String>> {
    config
        .services
        .keys()
        .map(|name| (name.clone(), config.admitted_callers(name)))
        .collect()
}

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a failing test panics")]

    use super::*;

    #[test]
    fn inbounds_admit_their_callers_their_allow_and_their_own_ingress() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.toml");
        std::fs::write(
            &path,
            r#"
version = 1
[mesh]
name = "shop"

[services.web]
command = "web"
expose = 8080
upstreams = ["api", "cache"]

[services.api]
command = "api"
upstreams = ["db"]
allow = ["admin"]

[services.db]
command = "db"

[services.cache]
command = "cache"
protocol = "tcp"

[services.admin]
command = "admin"
port = "none"
"#,
        )
        .unwrap();
        let config = mesh_supervisor::config::load(&path, &BTreeMap::new()).unwrap();
        let admitted = admitted(&config);
        let names = |s: &str| admitted[s].iter().cloned().collect::<Vec<_>>();
        assert_eq!(names("web"), ["ingress"]);
        assert_eq!(names("api"), ["admin", "web"]);
        assert_eq!(names("db"), ["api"]);
        assert_eq!(names("cache"), ["web"]);
        assert!(names("admin").is_empty());
    }
}
