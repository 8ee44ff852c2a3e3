//! Discovery: the other hosts' endpoints, kept up to date from etcd.
//!
//! A [`Discovery`] lists every key under `<prefix>/endpoints/`, publishes the table,
//! then watches the prefix from the revision after the list's, so that no change
//! between the two is missed, and publishes the table again after each change. Keys of
//! this host are left out (the runtime knows its own replicas better), and so are keys
//! that do not follow the layout or whose value cannot be read (each is logged once).
//!
//! The table is a [`RemoteEndpoints`] on a `tokio::sync::watch` channel; receivers are
//! woken only when the endpoints or the `stale` flag changed. What happens when things
//! go wrong:
//!
//! * **etcd unreachable, or the watch broken** (etcd restarted, the connection cut): the
//!   last known table stays published with `stale: true`, and after a jittered, growing
//!   delay (capped) the prefix is listed again and watched anew; the new table replaces
//!   the old one whole, with `stale: false`. Listing again rather than watching on from
//!   the last revision seen is deliberate: an etcd that restarted without its data counts
//!   revisions from 1 again under the same cluster id, and a watch from an old revision
//!   would then silently skip keys.
//! * **Compaction.** When etcd compacted the revisions the watch still had to report, it
//!   cancels the watch with `compact_revision`; the prefix is listed again at once and
//!   the table swapped whole, without being marked stale.
//! * **A silent watch** is not an error: keys that do not change send nothing. A member
//!   that vanishes without closing its connections is noticed only through TCP.
//!
//! Nothing is global: two discoveries in one process (two meshes, tests) are
//! independent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::sync::watch;
use tracing::Instrument;

use crate::backoff::{Backoff, Retries};
use crate::endpoint::{Layout, NameError, RemoteEndpoint, Value, check_name};
use crate::etcd::{self, Client, EventKind, KeyValue, WatchRequest};
use crate::task::AbortOnDrop;

/// What a discovery needs to know.
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    /// The mesh's key prefix (`[mesh] etcd.prefix`).
    pub prefix: String,
    /// This host's name: its own keys are left out of the table.
    pub host: String,
    /// The retry delays after failures.
    pub backoff: Backoff,
}

/// The other hosts' endpoints, as last read from etcd.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoteEndpoints {
    /// Per service, its endpoints on other hosts, ordered by host and replica. A service
    /// with none is absent.
    pub services: BTreeMap<String, Vec<RemoteEndpoint>>,
    /// Whether the table may be out of date: etcd has not been read yet, or the watch is
    /// broken and these are the last endpoints known.
    pub stale: bool,
    /// The etcd revision the table reflects (0 before the first list).
    pub revision: i64,
}

/// A running discovery. Dropping it stops it.
#[derive(Debug)]
pub struct Discovery {
    table: watch::Receiver<Arc<RemoteEndpoints>>,
    task: AbortOnDrop,
}

// === impl DiscoveryConfig ===

impl DiscoveryConfig {
    /// A configuration with the default backoff.
    pub fn new(prefix: impl Into<String>, host: impl Into<String>) -> Self {
        DiscoveryConfig {
            prefix: prefix.into(),
            host: host.into(),
            backoff: Backoff::default(),
        }
    }
}

// === impl RemoteEndpoints ===

impl RemoteEndpoints {
    /// `service`'s endpoints on other hosts (empty if none).
    pub fn endpoints(&self, service: &str) -> &[RemoteEndpoint] {
        self.services.get(service).map_or(&[], Vec::as_slice)
    }
}

// === impl Discovery ===

impl Discovery {
    /// Start listing and watching. Must be called on a Tokio runtime. The table starts
    /// empty and stale.
    pub fn start(client: Client, config: DiscoveryConfig) -> Result<Discovery, NameError> {
        check_name("host", &config.host)?;
        let (tx, table) = watch::channel(Arc::new(RemoteEndpoints {
            stale: true,
            ..RemoteEndpoints::default()
        }));
        let span = tracing::info_span!("etcd_discovery", host = %config.host);
        let follower = Follower {
            client,
            layout: Layout::new(&config.prefix),
            host: config.host,
            keys: BTreeMap::new(),
            ignored: BTreeSet::new(),
            tx,
        };
        let task = AbortOnDrop::spawn(follower.run(config.backoff).instrument(span));
        Ok(Discovery { table, task })
    }

    /// A receiver of the table, woken on each change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<RemoteEndpoints>> {
        self.table.clone()
    }

    /// The table now.
    pub fn current(&self) -> Arc<RemoteEndpoints> {
        self.table.borrow().clone()
    }

    /// Stop watching; returns once the task is gone. Receivers keep the last table.
    pub async fn shutdown(self) {
        self.task.stop("etcd discovery").await;
    }
}

// === The task ===

/// The task's state: the other hosts' keys as last read, and the channel.
struct Follower {
    client: Client,
    layout: Layout,
    host: String,
    /// Every endpoint key of other hosts, with what it names.
    keys: BTreeMap<Vec<u8>, (String, RemoteEndpoint)>,
    /// Keys already reported as unreadable, with their revision, so that each is logged
    /// once.
    ignored: BTreeSet<(Vec<u8>, i64)>,
    tx: watch::Sender<Arc<RemoteEndpoints>>,
}

/// How one list-and-watch ended.
enum End {
    /// The watch was canceled for compaction: list again now.
    Compacted(i64),
    /// Something failed: back off, then list again.
    Failed(etcd::Error),
}

impl Follower {
    async fn run(mut self, backoff: Backoff) {
        let mut retries = backoff.retries();
        loop {
            match self.follow(&mut retries).await {
                End::Compacted(revision) => {
                    tracing::info!(
                        compact_revision = revision,
                        "watch fell behind a compaction; listing again"
                    );
                }
                End::Failed(e) => {
                    let delay = retries.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "etcd discovery interrupted; keeping the last known endpoints");
                    self.tx.send_if_modified(|table| {
                        if table.stale {
                            return false;
                        }
                        Arc::make_mut(table).stale = true;
                        true
                    });
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// List, publish, then watch from the next revision and publish each change.
    async fn follow(&mut self, retries: &mut Retries) -> End {
        let prefix = self.layout.endpoints_prefix().as_bytes().to_vec();
        let listing = match self.client.range_prefix(&prefix).await {
            Ok(listing) => listing,
            Err(e) => return End::Failed(e),
        };
        let revision = listing.header.revision;
        self.keys.clear();
        for kv in &listing.kvs {
            self.upsert(kv);
        }
        self.publish(revision);
        let mut watch = match self
            .client
            .watch(WatchRequest {
                key: prefix.clone(),
                range_end: Some(etcd::prefix_end(&prefix)),
                start_revision: revision + 1,
                prev_kv: false,
            })
            .await
        {
            Ok(watch) => watch,
            Err(e) => return End::Failed(e),
        };
        loop {
            let response = match watch.next().await {
                Ok(response) => response,
                Err(e) => return End::Failed(e),
            };
            if response.compact_revision > 0 {
                return End::Compacted(response.compact_revision);
            }
            if response.canceled {
                return End::Failed(etcd::Error::WatchCanceled {
                    endpoint: watch.endpoint().into(),
                    reason: response.cancel_reason,
                });
            }
            if response.created {
                // Listed and watching: the next failure starts the backoff afresh.
                retries.reset();
            }
            for event in &response.events {
                match event.kind {
                    EventKind::Put => self.upsert(&event.kv),
                    EventKind::Delete => {
                        self.keys.remove(&event.kv.key);
                    }
                }
            }
            if !response.events.is_empty() {
                self.publish(response.header.revision);
            }
        }
    }

    /// Take in a key written at `kv.mod_revision`.
    fn upsert(&mut self, kv: &KeyValue) {
        let Some(parts) = self.layout.parse(&kv.key) else {
            self.ignore(
                kv,
                "the key does not follow <prefix>/endpoints/<service>/<host>/<replica>",
            );
            return;
        };
        if parts.host == self.host {
            return;
        }
        let value: Value = match serde_json::from_slice(&kv.value) {
            Ok(value) => value,
            Err(_) => {
                // A key written over with garbage no longer names an endpoint.
                self.keys.remove(&kv.key);
                self.ignore(
                    kv,
                    "the value is not {\"address\",\"identity\",\"protocol\"}",
                );
                return;
            }
        };
        let endpoint = RemoteEndpoint {
            host: parts.host,
            replica: parts.replica,
            address: value.address,
            identity: value.identity,
            protocol: value.protocol,
        };
        self.keys.insert(kv.key.clone(), (parts.service, endpoint));
    }

    fn ignore(&mut self, kv: &KeyValue, why: &str) {
        if self.ignored.insert((kv.key.clone(), kv.mod_revision)) {
            tracing::warn!(key = %String::from_utf8_lossy(&kv.key), "ignoring a key under the endpoints prefix: {why}");
        }
    }

    /// Publish the table at `revision`, fresh; receivers are woken only if the endpoints
    /// or the flag changed.
    fn publish(&self, revision: i64) {
        let mut services: BTreeMap<String, Vec<RemoteEndpoint>> = BTreeMap::new();
        for (service, endpoint) in self.keys.values() {
            services
                .entry(service.clone())
                .or_default()
                .push(endpoint.clone());
        }
        for endpoints in services.values_mut() {
            endpoints.sort_by(|a, b| (&a.host, a.replica).cmp(&(&b.host, b.replica)));
        }
        self.tx.send_if_modified(|table| {
            let changed = table.stale || table.services != services;
            *table = Arc::new(RemoteEndpoints {
                services,
                stale: false,
                revision,
            });
            changed
        });
    }
}
