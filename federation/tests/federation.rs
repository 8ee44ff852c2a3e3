//! Registration and discovery between hosts, against a real etcd: leases, keep-alives,
//! etcd restarts with and without data, compaction.
#![allow(clippy::unwrap_used, reason = "a failing test panics")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use mesh_federation::etcd::{EventKind, WatchRequest, prefix_end};
use mesh_federation::{
    Client, Discovery, DiscoveryConfig, Registry, RegistryConfig, RemoteEndpoint, RemoteEndpoints,
};
use support::{Data, Etcd, WatchGate, endpoint, patience, test_backoff, wait_table, within};
use tokio::time::Instant;

const PREFIX: &str = "/mesh/test";

fn registry(client: &Client, host: &str, ttl: Duration) -> Registry {
    let mut config = RegistryConfig::new(PREFIX, host, ttl);
    config.backoff = test_backoff();
    Registry::start(client.clone(), config).unwrap()
}

fn discovery(client: &Client, host: &str) -> Discovery {
    let mut config = DiscoveryConfig::new(PREFIX, host);
    config.backoff = test_backoff();
    Discovery::start(client.clone(), config).unwrap()
}

/// `service`'s endpoints in `table` as (host, replica, port).
fn seen(table: &RemoteEndpoints, service: &str) -> Vec<(String, u32, u16)> {
    table
        .endpoints(service)
        .iter()
        .map(|e: &RemoteEndpoint| (e.host.clone(), e.replica, e.address.port()))
        .collect()
}

fn at(host: &str, replica: u32, port: u16) -> (String, u32, u16) {
    (host.to_string(), replica, port)
}

fn fresh(table: &Arc<RemoteEndpoints>) -> bool {
    !table.stale
}

#[tokio::test]
async fn registered_endpoints_reach_the_other_hosts_tables() {
    let etcd = Etcd::start().await;
    let raw = etcd.client();
    let a = registry(&etcd.client(), "edge-a", Duration::from_secs(10));
    let b = registry(&etcd.client(), "edge-b", Duration::from_secs(10));
    let seen_by_a = discovery(&etcd.client(), "edge-a");
    let seen_by_b = discovery(&etcd.client(), "edge-b");
    let mut table_a = seen_by_a.subscribe();
    let mut table_b = seen_by_b.subscribe();

    a.put(endpoint("api", 0, 1000)).await.unwrap();
    a.put(endpoint("api", 1, 1001)).await.unwrap();
    a.put(endpoint("web", 0, 1100)).await.unwrap();
    b.put(endpoint("api", 0, 2000)).await.unwrap();

    // Each host sees the other's endpoints, never its own.
    let table = wait_table(&mut table_b, "b sees a", Duration::from_secs(10), |t| {
        fresh(t) && seen(t, "api").len() == 2 && seen(t, "web").len() == 1
    })
    .await;
    assert_eq!(
        seen(&table, "api"),
        [at("edge-a", 0, 1000), at("edge-a", 1, 1001)]
    );
    assert_eq!(seen(&table, "web"), [at("edge-a", 0, 1100)]);
    let web = &table.endpoints("web")[0];
    assert_eq!(web.identity, "spiffe://test/web");
    assert_eq!(web.protocol, mesh_federation::Protocol::Http);
    let table = wait_table(&mut table_a, "a sees b", Duration::from_secs(10), |t| {
        fresh(t) && !seen(t, "api").is_empty()
    })
    .await;
    assert_eq!(seen(&table, "api"), [at("edge-b", 0, 2000)]);
    assert!(seen(&table, "web").is_empty());

    // The key layout and value, as `etcdctl get --prefix` shows them.
    let kv = raw
        .range(b"/mesh/test/endpoints/web/edge-a/0", None)
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(kv.kvs[0].value.clone()).unwrap(),
        r#"{"address":"127.0.0.1:1100","identity":"spiffe://test/web","protocol":"http"}"#
    );
    assert_eq!(Some(kv.kvs[0].lease), a.lease().await.map(|l| l.0));

    // Keys that are not endpoints are left out of the table.
    raw.put(b"/mesh/test/endpoints/api/edge-c/one", br#"{}"#, None)
        .await
        .unwrap();
    raw.put(b"/mesh/test/endpoints/api/edge-c/0", b"not json", None)
        .await
        .unwrap();
    // A change after those, to know when they were read.
    a.put(endpoint("db", 0, 1200)).await.unwrap();
    let table = wait_table(
        &mut table_b,
        "b read past the garbage",
        Duration::from_secs(10),
        |t| !seen(t, "db").is_empty(),
    )
    .await;
    assert_eq!(
        seen(&table, "api"),
        [at("edge-a", 0, 1000), at("edge-a", 1, 1001)]
    );
    a.delete("db", 0).await.unwrap();

    // A delete is seen at once; so is a changed address.
    a.delete("api", 1).await.unwrap();
    a.put(endpoint("api", 0, 1010)).await.unwrap();
    wait_table(
        &mut table_b,
        "b sees the changes",
        Duration::from_secs(10),
        |t| seen(t, "api") == [at("edge-a", 0, 1010)],
    )
    .await;

    // A shutdown revokes the lease: every key of edge-a goes in one revision.
    let from = raw.range(b"/", None).await.unwrap().header.revision + 1;
    let mut watch = raw
        .watch(WatchRequest {
            key: b"/mesh/test/endpoints/".to_vec(),
            range_end: Some(prefix_end(b"/mesh/test/endpoints/")),
            start_revision: from,
            prev_kv: false,
        })
        .await
        .unwrap();
    a.shutdown().await.unwrap();
    let deletes = within("the revocation's events", Duration::from_secs(10), async {
        loop {
            let response = watch.next().await.unwrap();
            if !response.events.is_empty() {
                return response;
            }
        }
    })
    .await;
    let mut keys: Vec<String> = deletes
        .events
        .iter()
        .map(|e| {
            assert_eq!(e.kind, EventKind::Delete);
            assert_eq!(e.kv.mod_revision, deletes.header.revision);
            String::from_utf8(e.kv.key.clone()).unwrap()
        })
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "/mesh/test/endpoints/api/edge-a/0",
            "/mesh/test/endpoints/web/edge-a/0"
        ]
    );
    wait_table(&mut table_b, "edge-a gone", Duration::from_secs(10), |t| {
        seen(t, "api").is_empty() && seen(t, "web").is_empty()
    })
    .await;
    let left = raw.range_prefix(b"/mesh/test/endpoints/").await.unwrap();
    assert!(
        left.kvs
            .iter()
            .all(|kv| !String::from_utf8_lossy(&kv.key).contains("/edge-a/")),
        "keys of edge-a left after its shutdown"
    );

    b.shutdown().await.unwrap();
    within("discoveries stop", Duration::from_secs(5), async {
        seen_by_a.shutdown().await;
        seen_by_b.shutdown().await;
    })
    .await;
    etcd.stop().await;
}

#[tokio::test]
async fn a_host_that_stops_keeping_its_lease_disappears_within_the_ttl() {
    let etcd = Etcd::start().await;
    let ttl = Duration::from_secs(2);
    let a = registry(&etcd.client(), "edge-a", ttl);
    let seen_by_b = discovery(&etcd.client(), "edge-b");
    let mut table = seen_by_b.subscribe();

    a.put(endpoint("api", 0, 1000)).await.unwrap();
    wait_table(&mut table, "registered", Duration::from_secs(10), |t| {
        seen(t, "api").len() == 1
    })
    .await;

    // Kept alive: still there after twice the time to live.
    let vanished = tokio::time::timeout(2 * ttl, table.wait_for(|t| seen(t, "api").is_empty()))
        .await
        .is_ok();
    assert!(
        !vanished,
        "the endpoint vanished while its lease was kept alive"
    );

    // Dropped without a shutdown: the keep-alives stop and etcd ends the lease.
    drop(a);
    let dropped = Instant::now();
    wait_table(&mut table, "expired", ttl + Duration::from_secs(5), |t| {
        seen(t, "api").is_empty()
    })
    .await;
    let took = dropped.elapsed();
    eprintln!("the endpoint expired {took:?} after its registry was dropped (ttl {ttl:?})");
    // etcd checks for expired leases every 500 ms; allow that and some scheduling.
    assert!(
        took <= ttl + patience(Duration::from_millis(1500)),
        "the endpoint outlived its lease: gone {took:?} after the last keep-alive stopped"
    );
    assert!(!table.borrow().stale);

    seen_by_b.shutdown().await;
    etcd.stop().await;
}

#[tokio::test]
async fn etcd_restarted_with_its_data_marks_the_table_stale_then_recovers() {
    let mut etcd = Etcd::start().await;
    // Longer than the restart: the lease survives it.
    let a = registry(&etcd.client(), "edge-a", Duration::from_secs(20));
    let seen_by_b = discovery(&etcd.client(), "edge-b");
    let mut table = seen_by_b.subscribe();
    a.put(endpoint("api", 0, 1000)).await.unwrap();
    wait_table(&mut table, "registered", Duration::from_secs(10), |t| {
        fresh(t) && seen(t, "api").len() == 1
    })
    .await;
    let lease = a.lease().await.unwrap();

    etcd.kill().await;
    // The watch broke: the last known endpoints stay, marked stale.
    let table_now = wait_table(&mut table, "stale", Duration::from_secs(10), |t| t.stale).await;
    assert_eq!(seen(&table_now, "api"), [at("edge-a", 0, 1000)]);
    // Changes while etcd is down fail, naming the member, and are kept.
    let e = a.put(endpoint("api", 1, 1001)).await.unwrap_err();
    assert!(e.to_string().contains(&etcd.url()), "{e}");
    let e = a.delete("api", 0).await.unwrap_err();
    assert!(e.to_string().contains(&etcd.url()), "{e}");

    etcd.restart(Data::Same).await;
    let table_now = wait_table(&mut table, "recovered", Duration::from_secs(20), |t| {
        fresh(t) && seen(t, "api") == [at("edge-a", 1, 1001)]
    })
    .await;
    assert_eq!(table_now.services.len(), 1);
    assert_eq!(
        a.lease().await,
        Some(lease),
        "the lease survives a restart with data"
    );

    a.shutdown().await.unwrap();
    seen_by_b.shutdown().await;
    etcd.stop().await;
}

#[tokio::test]
async fn etcd_restarted_without_its_data_gets_a_new_lease_and_every_endpoint_again() {
    let mut etcd = Etcd::start().await;
    let a = registry(&etcd.client(), "edge-a", Duration::from_secs(5));
    let seen_by_b = discovery(&etcd.client(), "edge-b");
    let mut table = seen_by_b.subscribe();
    a.put(endpoint("api", 0, 1000)).await.unwrap();
    a.put(endpoint("web", 0, 1100)).await.unwrap();
    wait_table(&mut table, "registered", Duration::from_secs(10), |t| {
        fresh(t) && seen(t, "api").len() == 1 && seen(t, "web").len() == 1
    })
    .await;
    let lease = a.lease().await.unwrap();

    etcd.kill().await;
    wait_table(&mut table, "stale", Duration::from_secs(10), |t| t.stale).await;
    etcd.restart(Data::Fresh).await;

    // The fresh etcd knows no lease: the registry is granted another and writes every
    // endpoint again; the discovery lists the new store.
    let table_now = wait_table(
        &mut table,
        "registered again",
        Duration::from_secs(20),
        |t| fresh(t) && seen(t, "api").len() == 1 && seen(t, "web").len() == 1,
    )
    .await;
    assert_eq!(seen(&table_now, "api"), [at("edge-a", 0, 1000)]);
    let new_lease = a.lease().await.unwrap();
    assert_ne!(new_lease, lease);
    let keys = etcd
        .client()
        .range_prefix(b"/mesh/test/endpoints/")
        .await
        .unwrap();
    assert_eq!(keys.count, 2);
    assert!(keys.kvs.iter().all(|kv| kv.lease == new_lease.0));

    a.shutdown().await.unwrap();
    seen_by_b.shutdown().await;
    etcd.stop().await;
}

#[tokio::test]
async fn a_watch_behind_a_compaction_lists_again() {
    let etcd = Etcd::start().await;
    let raw = etcd.client();
    let value = |port: u16| {
        format!(
            r#"{{"address":"127.0.0.1:{port}","identity":"spiffe://test/api","protocol":"http"}}"#
        )
    };
    raw.put(
        b"/mesh/test/endpoints/api/edge-a/0",
        value(1000).as_bytes(),
        None,
    )
    .await
    .unwrap();

    // The discovery reaches etcd through a gate that holds its watch back.
    let mut gate = WatchGate::start(etcd.addr()).await;
    let seen_by_b = discovery(&support::client(&gate.url()), "edge-b");
    let mut table = seen_by_b.subscribe();
    gate.wait_watches(1).await;
    let listed = wait_table(&mut table, "listed", Duration::from_secs(10), fresh).await;
    assert_eq!(seen(&listed, "api"), [at("edge-a", 0, 1000)]);

    // Meanwhile the endpoints change and etcd compacts the revisions of those changes:
    // the held watch, from the revision after the list, can never report them.
    raw.put(
        b"/mesh/test/endpoints/api/edge-a/1",
        value(1001).as_bytes(),
        None,
    )
    .await
    .unwrap();
    raw.delete_range(b"/mesh/test/endpoints/api/edge-a/0", None)
        .await
        .unwrap();
    let last = raw
        .put(
            b"/mesh/test/endpoints/web/edge-a/0",
            value(1100).as_bytes(),
            None,
        )
        .await
        .unwrap();
    raw.compact(last.revision).await.unwrap();
    gate.open();

    // etcd cancels the watch for compaction; the discovery lists again and watches on.
    let table_now = wait_table(&mut table, "listed again", Duration::from_secs(10), |t| {
        seen(t, "api") == [at("edge-a", 1, 1001)]
    })
    .await;
    assert_eq!(seen(&table_now, "web"), [at("edge-a", 0, 1100)]);
    assert!(!table_now.stale);
    assert!(table_now.revision >= last.revision);
    gate.wait_watches(2).await;

    // And the new watch works.
    raw.delete_range(b"/mesh/test/endpoints/web/edge-a/0", None)
        .await
        .unwrap();
    wait_table(&mut table, "watching again", Duration::from_secs(10), |t| {
        seen(t, "web").is_empty()
    })
    .await;

    seen_by_b.shutdown().await;
    etcd.stop().await;
}

#[tokio::test]
async fn a_lease_lost_behind_the_registrys_back_is_granted_again() {
    let etcd = Etcd::start().await;
    let raw = etcd.client();
    let a = registry(&etcd.client(), "edge-a", Duration::from_secs(3));
    let seen_by_b = discovery(&etcd.client(), "edge-b");
    let mut table = seen_by_b.subscribe();
    a.put(endpoint("api", 0, 1000)).await.unwrap();
    a.put(endpoint("api", 1, 1001)).await.unwrap();
    wait_table(&mut table, "registered", Duration::from_secs(10), |t| {
        seen(t, "api").len() == 2
    })
    .await;
    let lease = a.lease().await.unwrap();

    // The lease ends without the registry knowing (as when it was cut off too long).
    raw.lease_revoke(lease).await.unwrap();
    wait_table(&mut table, "revoked", Duration::from_secs(10), |t| {
        seen(t, "api").is_empty()
    })
    .await;

    // The next keep-alive learns it; every endpoint is written again under a new lease.
    wait_table(
        &mut table,
        "registered again",
        Duration::from_secs(10),
        |t| seen(t, "api").len() == 2,
    )
    .await;
    let new_lease = a.lease().await.unwrap();
    assert_ne!(new_lease, lease);
    let keys = raw.range_prefix(b"/mesh/test/endpoints/").await.unwrap();
    assert!(keys.kvs.iter().all(|kv| kv.lease == new_lease.0));

    a.shutdown().await.unwrap();
    assert_eq!(raw.range_prefix(b"/mesh/test/").await.unwrap().count, 0);
    seen_by_b.shutdown().await;
    etcd.stop().await;
}
