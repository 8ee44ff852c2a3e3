//! Registration: this host's endpoints in etcd, under one lease.
//!
//! A [`Registry`] holds one lease for the host and writes each endpoint it is given
//! under `<prefix>/endpoints/<service>/<host>/<replica>`, attached to that lease. A task
//! keeps the lease alive every third of its time to live. What happens when things go
//! wrong:
//!
//! * **etcd unreachable or slow.** [`Registry::put`] and [`Registry::delete`] return the
//!   error, but the change is kept: the registry knows which keys etcd may not have
//!   right and writes them as soon as a keep-alive gets through again. Retries wait a
//!   jittered, growing delay (at most a third of the lease's time to live, so that a
//!   lease can still be saved), never in a tight loop.
//! * **Lease lost.** A keep-alive answered with a time to live of 0, or a write refused
//!   because the lease does not exist, means etcd dropped the lease (the host was cut
//!   off longer than the time to live, or etcd restarted without its data) and with it
//!   every key of the host. The registry is granted a new lease and writes every current
//!   endpoint again.
//! * **etcd restarted with its data.** Leases survive a restart (etcd renews them on
//!   start), so keep-alives simply succeed again.
//! * **Graceful shutdown.** [`Registry::shutdown`] revokes the lease: every key of the
//!   host disappears in one revision, which other hosts see as one watch event.
//! * **Dropped or killed without shutdown.** Keep-alives stop; etcd deletes the host's
//!   keys when the lease's time to live runs out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Notify};
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::endpoint::{Endpoint, Layout, NameError, check_name};
use crate::etcd::{self, Client, LeaseId};
use crate::task::AbortOnDrop;

/// What a registry needs to know.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// The mesh's key prefix (`[mesh] etcd.prefix`, `/mesh/<name>` by default).
    pub prefix: String,
    /// This host's name, the key segment its endpoints are written under.
    pub host: String,
    /// The lease's time to live (`[mesh] etcd.lease_ttl`): how long the host's
    /// endpoints outlive it when it stops without a shutdown. Whole seconds, at least 1.
    pub lease_ttl: Duration,
    /// The retry delays after failures.
    pub backoff: Backoff,
}

/// This host's endpoints in etcd. Dropping it stops the keep-alives without revoking
/// the lease (the keys then expire); [`Registry::shutdown`] removes them at once.
#[derive(Debug)]
pub struct Registry {
    shared: Arc<Shared>,
    keeper: AbortOnDrop,
}

/// Why a registration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// A name cannot be a key segment.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A time to live etcd cannot grant.
    #[error("lease_ttl {0:?} is below etcd's minimum of one second")]
    LeaseTtl(Duration),
    /// etcd did not take the change now; the registry writes it once etcd answers again.
    #[error(transparent)]
    Etcd(#[from] etcd::Error),
}

// === impl RegistryConfig ===

impl RegistryConfig {
    /// A configuration with the default backoff.
    pub fn new(prefix: impl Into<String>, host: impl Into<String>, lease_ttl: Duration) -> Self {
        RegistryConfig {
            prefix: prefix.into(),
            host: host.into(),
            lease_ttl,
            backoff: Backoff::default(),
        }
    }
}

// === impl Registry ===

impl Registry {
    /// Start registering as `config.host`: a task is granted the lease and keeps it
    /// alive. Must be called on a Tokio runtime. Fails only on a bad host name or time
    /// to live; an unreachable etcd is retried in the background.
    pub fn start(client: Client, config: RegistryConfig) -> Result<Registry, RegistryError> {
        check_name("host", &config.host)?;
        if config.lease_ttl < Duration::from_secs(1) {
            return Err(RegistryError::LeaseTtl(config.lease_ttl));
        }
        // A keep-alive that takes longer than a third of the lease's life is as good as
        // lost: give up on it in time to try again before the lease ends.
        let client = {
            let third = config.lease_ttl / 3;
            let timeout = client.request_timeout().min(third);
            client.with_request_timeout(timeout)
        };
        let shared = Arc::new(Shared {
            client,
            layout: Layout::new(&config.prefix),
            host: config.host.clone(),
            ttl: config.lease_ttl,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        });
        let span = tracing::info_span!("etcd_registry", host = %config.host);
        let keeper = AbortOnDrop::spawn(keep(shared.clone(), config.backoff).instrument(span));
        Ok(Registry { shared, keeper })
    }

    /// Register `endpoint` (or change it): write its key under the host's lease. On an
    /// error the endpoint stays registered here and is written once etcd answers again.
    pub async fn put(&self, endpoint: Endpoint) -> Result<(), RegistryError> {
        check_name("service", &endpoint.service)?;
        let id = (endpoint.service.clone(), endpoint.replica);
        let mut state = self.shared.state.lock().await;
        state.endpoints.insert(id.clone(), endpoint);
        state.dirty.insert(id.clone());
        let result = self.shared.write(&mut state, &id).await;
        if result.is_err() || !state.dirty.is_empty() {
            self.shared.wake.notify_one();
        }
        Ok(result?)
    }

    /// Unregister `service`'s replica `replica`: delete its key now. On an error the key
    /// is deleted once etcd answers again (or expires with the lease).
    pub async fn delete(&self, service: &str, replica: u32) -> Result<(), RegistryError> {
        check_name("service", service)?;
        let id = (service.to_string(), replica);
        let mut state = self.shared.state.lock().await;
        if state.endpoints.remove(&id).is_none() && !state.dirty.contains(&id) {
            return Ok(());
        }
        state.dirty.insert(id.clone());
        let result = self.shared.write(&mut state, &id).await;
        if result.is_err() {
            self.shared.wake.notify_one();
        }
        Ok(result?)
    }

    /// The lease the host's keys are attached to, if one is held now.
    pub async fn lease(&self) -> Option<LeaseId> {
        self.shared.state.lock().await.lease
    }

    /// The endpoints registered here (whether or not etcd has them yet).
    pub async fn endpoints(&self) -> Vec<Endpoint> {
        self.shared
            .state
            .lock()
            .await
            .endpoints
            .values()
            .cloned()
            .collect()
    }

    /// Stop keeping the lease alive and revoke it: every key of the host is deleted in
    /// one revision. If etcd cannot be reached, the error is returned and the keys expire
    /// with the lease instead.
    pub async fn shutdown(self) -> Result<(), RegistryError> {
        let Registry { shared, keeper } = self;
        keeper.stop("etcd lease keeper").await;
        let mut state = shared.state.lock().await;
        state.endpoints.clear();
        state.dirty.clear();
        let Some(lease) = state.lease.take() else {
            return Ok(());
        };
        match shared.client.lease_revoke(lease).await {
            Ok(_) => {
                tracing::info!(host = %shared.host, lease = lease.0, "lease revoked; endpoints removed");
                Ok(())
            }
            // Gone already: so are the keys.
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

// === Shared state ===

/// A service and a replica index.
type EndpointId = (String, u32);

#[derive(Debug)]
struct Shared {
    client: Client,
    layout: Layout,
    host: String,
    ttl: Duration,
    state: Mutex<State>,
    /// Tells the keeper that a write failed or some keys are left to write.
    wake: Notify,
}

/// Held across etcd calls, so that a put and a new lease's rewriting of every key never
/// interleave.
#[derive(Debug, Default)]
struct State {
    lease: Option<LeaseId>,
    /// The endpoints registered here.
    endpoints: BTreeMap<EndpointId, Endpoint>,
    /// The keys etcd may not have right: to put if in `endpoints`, to delete otherwise.
    dirty: BTreeSet<EndpointId>,
}

impl Shared {
    /// The lease, granted first if none is held. A new lease has none of the host's keys:
    /// every endpoint is marked for writing.
    async fn lease(&self, state: &mut State) -> Result<LeaseId, etcd::Error> {
        if let Some(lease) = state.lease {
            return Ok(lease);
        }
        let lease = self.client.lease_grant(self.ttl).await?;
        tracing::info!(lease = lease.id.0, ttl = ?lease.ttl, "lease granted");
        state.lease = Some(lease.id);
        state.dirty = state.endpoints.keys().cloned().collect();
        Ok(lease.id)
    }

    /// Bring `id`'s key in etcd in line with `state`.
    async fn write(&self, state: &mut State, id: &EndpointId) -> Result<(), etcd::Error> {
        let key = self.layout.key(&id.0, &self.host, id.1);
        let result = match state.endpoints.get(id) {
            Some(endpoint) => {
                let value = endpoint.value();
                let lease = self.lease(state).await?;
                self.client
                    .put(key.as_bytes(), &value, Some(lease))
                    .await
                    .map(drop)
            }
            // Without a lease, the host has no keys in etcd.
            None if state.lease.is_none() => Ok(()),
            None => self
                .client
                .delete_range(key.as_bytes(), None)
                .await
                .map(drop),
        };
        match result {
            Ok(()) => {
                state.dirty.remove(id);
                Ok(())
            }
            Err(e) => {
                if e.is_not_found() {
                    self.lost(state);
                }
                Err(e)
            }
        }
    }

    /// etcd no longer has the lease, nor any key of the host.
    fn lost(&self, state: &mut State) {
        if let Some(lease) = state.lease.take() {
            tracing::warn!(
                lease = lease.0,
                "lease lost (expired, or etcd lost its data); granting a new one and registering every endpoint again"
            );
        }
        state.dirty = state.endpoints.keys().cloned().collect();
    }

    /// One round of the keeper: renew the lease (or get a new one) and write what is
    /// left to write.
    async fn tick(&self) -> Result<(), etcd::Error> {
        let lease = self.state.lock().await.lease;
        if let Some(lease) = lease {
            let alive = match self.client.lease_keepalive(lease).await {
                Ok(ttl) => ttl.is_some(),
                Err(e) if e.is_not_found() => false,
                Err(e) => return Err(e),
            };
            if !alive {
                let mut state = self.state.lock().await;
                // Unless a put found out first and a new lease is held already.
                if state.lease == Some(lease) {
                    self.lost(&mut state);
                }
            }
        }
        let mut state = self.state.lock().await;
        self.lease(&mut state).await?;
        let dirty: Vec<EndpointId> = state.dirty.iter().cloned().collect();
        for id in dirty {
            self.write(&mut state, &id).await?;
        }
        Ok(())
    }
}

/// The keeper task: a round every third of the time to live, or sooner when a write
/// failed; after a failed round, a backoff delay (capped at that third) instead.
async fn keep(shared: Arc<Shared>, backoff: Backoff) {
    let interval = shared.ttl / 3;
    let mut retries = backoff.retries();
    let mut failing = false;
    loop {
        match shared.tick().await {
            Ok(()) => {
                if failing {
                    tracing::info!("registration in etcd is up to date again");
                }
                failing = false;
                retries.reset();
            }
            Err(e) => {
                tracing::warn!(error = %e, failures = retries.failures() + 1, "etcd registration failed; retrying");
                failing = true;
            }
        }
        if failing {
            tokio::time::sleep(retries.next_delay().min(interval)).await;
        } else {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shared.wake.notified() => {}
            }
        }
    }
}
