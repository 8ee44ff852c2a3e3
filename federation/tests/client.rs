//! The etcd gateway client against a real etcd.
#![allow(clippy::unwrap_used, reason = "a failing test panics")]

mod support;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use mesh_federation::Client;
use mesh_federation::etcd::{Error, EventKind, WatchRequest, prefix_end};
use serde_json::json;
use support::{Etcd, free_port, patience, raw_post, within};
use tokio::net::TcpListener;
use tokio::time::Instant;

#[tokio::test]
async fn kv_round_trip_in_base64_with_int64_as_strings() {
    let etcd = Etcd::start().await;
    let client = etcd.client();
    // Bytes that are neither UTF-8 nor safe in a URL or JSON string unencoded.
    let key: &[u8] = b"/t/bin/\x00\xff\xfe \"k\"";
    let value: &[u8] = &[0, 1, 2, 0xff, b'{', b'"', b'\n'];

    let put = client.put(key, value, None).await.unwrap();
    assert!(put.revision > 1);
    let got = client.range(key, None).await.unwrap();
    assert_eq!(got.count, 1);
    assert_eq!(got.header.revision, put.revision);
    let kv = &got.kvs[0];
    assert_eq!((kv.key.as_slice(), kv.value.as_slice()), (key, value));
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version, kv.lease),
        (put.revision, put.revision, 1, 0)
    );

    // What went over the wire: base64 keys and values, 64-bit integers as strings.
    let raw = raw_post(
        etcd.addr(),
        "/v3/kv/range",
        &json!({ "key": BASE64.encode(key) }),
    )
    .await;
    assert_eq!(raw["header"]["revision"], json!(put.revision.to_string()));
    assert_eq!(raw["count"], json!("1"));
    assert_eq!(raw["kvs"][0]["key"], json!(BASE64.encode(key)));
    assert_eq!(raw["kvs"][0]["value"], json!(BASE64.encode(value)));
    assert_eq!(raw["kvs"][0]["version"], json!("1"));

    let again = client.put(key, b"second", None).await.unwrap();
    let kv = &client.range(key, None).await.unwrap().kvs[0];
    assert_eq!(
        (kv.version, kv.create_revision, kv.mod_revision),
        (2, put.revision, again.revision)
    );
    assert_eq!(kv.value, b"second");

    // Nothing found: the gateway leaves `kvs` and `count` out; they read as empty.
    let raw = raw_post(
        etcd.addr(),
        "/v3/kv/range",
        &json!({ "key": BASE64.encode(b"/none") }),
    )
    .await;
    assert!(
        raw.get("kvs").is_none() && raw.get("count").is_none(),
        "{raw}"
    );
    let none = client.range(b"/none", None).await.unwrap();
    assert!(none.kvs.is_empty());
    assert_eq!(none.count, 0);

    // Prefixes.
    for k in ["/t/p/a", "/t/p/b", "/t/q"] {
        client.put(k.as_bytes(), b"x", None).await.unwrap();
    }
    let listed = client.range_prefix(b"/t/p/").await.unwrap();
    let keys: Vec<&[u8]> = listed.kvs.iter().map(|kv| kv.key.as_slice()).collect();
    assert_eq!(keys, [b"/t/p/a".as_slice(), b"/t/p/b".as_slice()]);

    let deleted = client.delete_range(key, None).await.unwrap();
    assert_eq!(deleted.deleted, 1);
    assert!(deleted.header.revision > again.revision);
    assert!(client.range(key, None).await.unwrap().kvs.is_empty());
    let deleted = client
        .delete_range(b"/t/p/", Some(&prefix_end(b"/t/p/")))
        .await
        .unwrap();
    assert_eq!(deleted.deleted, 2);
    assert_eq!(client.range_prefix(b"/t/").await.unwrap().count, 1);

    etcd.stop().await;
}

#[tokio::test]
async fn leases_are_granted_kept_alive_and_revoked() {
    let etcd = Etcd::start().await;
    let client = etcd.client();

    let lease = client.lease_grant(Duration::from_secs(5)).await.unwrap();
    assert_eq!(lease.ttl, Duration::from_secs(5));
    client.put(b"/l/a", b"1", Some(lease.id)).await.unwrap();
    client.put(b"/l/b", b"2", Some(lease.id)).await.unwrap();
    assert_eq!(
        client.range(b"/l/a", None).await.unwrap().kvs[0].lease,
        lease.id.0
    );
    assert_eq!(
        client.lease_keepalive(lease.id).await.unwrap(),
        Some(Duration::from_secs(5))
    );

    client.lease_revoke(lease.id).await.unwrap();
    assert_eq!(client.range_prefix(b"/l/").await.unwrap().count, 0);
    // A lease that is gone: a time to live of 0 to a keep-alive, "not found" otherwise.
    assert_eq!(client.lease_keepalive(lease.id).await.unwrap(), None);
    let e = client.lease_revoke(lease.id).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e = client.put(b"/l/c", b"3", Some(lease.id)).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(
        e.to_string().contains(&etcd.url()),
        "the error names the member: {e}"
    );

    etcd.stop().await;
}

#[tokio::test]
async fn watches_stream_changes_report_compaction_and_end_with_etcd() {
    let mut etcd = Etcd::start().await;
    let client = etcd.client();
    let start = client.put(b"/w/a", b"1", None).await.unwrap().revision;

    let mut watch = client
        .watch(WatchRequest {
            key: b"/w/".to_vec(),
            range_end: Some(prefix_end(b"/w/")),
            start_revision: start + 1,
            prev_kv: true,
        })
        .await
        .unwrap();
    let created = within("created", Duration::from_secs(5), watch.next())
        .await
        .unwrap();
    assert!(created.created && !created.canceled);

    let put_b = client.put(b"/w/b", b"2", None).await.unwrap().revision;
    let delete_a = client
        .delete_range(b"/w/a", None)
        .await
        .unwrap()
        .header
        .revision;
    let mut events = Vec::new();
    while events.len() < 2 {
        let response = within("events", Duration::from_secs(5), watch.next())
            .await
            .unwrap();
        assert!(!response.canceled);
        events.extend(response.events);
    }
    assert_eq!(events[0].kind, EventKind::Put);
    assert_eq!(
        (events[0].kv.key.as_slice(), events[0].kv.value.as_slice()),
        (b"/w/b".as_slice(), b"2".as_slice())
    );
    assert_eq!(events[0].kv.mod_revision, put_b);
    assert_eq!(events[1].kind, EventKind::Delete);
    assert_eq!(events[1].kv.key, b"/w/a");
    assert_eq!(events[1].kv.mod_revision, delete_a);
    assert_eq!(events[1].prev_kv.as_ref().unwrap().value, b"1");

    // A watch from a compacted revision is canceled at once, saying where history starts.
    client.compact(delete_a).await.unwrap();
    let mut late = client
        .watch(WatchRequest {
            key: b"/w/".to_vec(),
            range_end: Some(prefix_end(b"/w/")),
            start_revision: start,
            prev_kv: false,
        })
        .await
        .unwrap();
    // etcd 3.4 first says the watch was created, then cancels it.
    let canceled = within("compacted", Duration::from_secs(5), async {
        loop {
            let response = late.next().await.unwrap();
            if response.canceled {
                return response;
            }
            assert!(
                response.created && response.events.is_empty(),
                "{response:?}"
            );
        }
    })
    .await;
    assert_eq!(canceled.compact_revision, delete_a);

    // The first watch is still open; it ends when etcd dies.
    etcd.kill().await;
    let ended = within("watch end", Duration::from_secs(5), watch.next()).await;
    let e = ended.unwrap_err();
    assert!(e.to_string().contains(&etcd.url()), "{e}");

    etcd.stop().await;
}

#[tokio::test]
async fn unreachable_members_are_skipped_and_failures_name_them() {
    let etcd = Etcd::start().await;
    let dead = format!("http://127.0.0.1:{}", free_port());

    // A member that refuses connections is skipped.
    let client = Client::new([dead.as_str(), etcd.url().as_str()])
        .unwrap()
        .with_request_timeout(Duration::from_secs(2));
    client.put(b"/m", b"1", None).await.unwrap();
    assert_eq!(client.range(b"/m", None).await.unwrap().count, 1);

    // None reachable: the error names the call and every member.
    let other_dead = format!("http://127.0.0.1:{}", free_port());
    let none = Client::new([dead.as_str(), other_dead.as_str()]).unwrap();
    let e = none.range(b"/m", None).await.unwrap_err();
    assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
    let message = e.to_string();
    assert!(
        message.starts_with("range:") && message.contains(&dead) && message.contains(&other_dead),
        "{message}"
    );

    // A member that accepts and never answers: the call times out, naming it.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let slow = Client::new([silent_url.as_str()])
        .unwrap()
        .with_request_timeout(Duration::from_millis(300));
    let began = Instant::now();
    let e = slow.range(b"/m", None).await.unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(e.to_string().contains(&silent_url), "{e}");
    assert!(began.elapsed() < patience(Duration::from_secs(3)));
    hold.abort();

    etcd.stop().await;
}
