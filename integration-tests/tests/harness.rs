//! Self-tests of the harness: the servers it starts are what the end-to-end
//! tests and the quickstart assume (logical decoding, a replication-capable
//! role, a working emulator, loopback-only listeners).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::process::Command;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use tributary_integration_tests::{
    DEFAULT_DATABASE, InstantKinesis, Kinesalite, Postgres, SUPERUSER, USER, kinesis_client,
    listening_addresses,
};

/// Asserts that `port` is listened on, and only on 127.0.0.1.
fn assert_loopback_only(port: u16) {
    let addrs = listening_addresses(port).unwrap();
    assert!(!addrs.is_empty(), "nothing listens on port {port}");
    for addr in &addrs {
        assert_eq!(
            addr.ip(),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "port {port} is listened on at {addr}: {addrs:?}"
        );
    }
}

async fn show(client: &tokio_postgres::Client, setting: &str) -> String {
    let row = client
        .query_one(&format!("SHOW {setting}"), &[])
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test]
async fn postgres_is_configured_for_logical_replication() {
    let pg = Postgres::start().await.unwrap();
    let client = pg.client(DEFAULT_DATABASE).await.unwrap();
    assert_eq!(show(&client, "wal_level").await, "logical");
    assert_eq!(show(&client, "max_replication_slots").await, "10");
    assert_eq!(show(&client, "max_wal_senders").await, "10");
    assert_eq!(show(&client, "listen_addresses").await, "127.0.0.1");
    assert_eq!(show(&client, "port").await, pg.port().to_string());

    let row = client
        .query_one(
            "SELECT current_user::text, current_database()::text, r.rolreplication, r.rolsuper,
                    pg_get_userbyid(d.datdba)::text
             FROM pg_roles r, pg_database d
             WHERE r.rolname = current_user AND d.datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), USER);
    assert_eq!(row.get::<_, String>(1), DEFAULT_DATABASE);
    assert!(row.get::<_, bool>(2), "{USER} lacks REPLICATION");
    assert!(!row.get::<_, bool>(3), "{USER} must not be a superuser");
    assert_eq!(
        row.get::<_, String>(4),
        USER,
        "{DEFAULT_DATABASE} is not owned by {USER}"
    );

    assert_eq!(
        pg.url(DEFAULT_DATABASE),
        format!("postgres://tributary@127.0.0.1:{}/shop", pg.port())
    );
    assert_loopback_only(pg.port());
}

#[tokio::test]
async fn tributary_role_can_decode_changes_from_a_logical_slot() {
    let pg = Postgres::start().await.unwrap();
    pg.execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text);
         CREATE PUBLICATION harness_pub FOR TABLE items;",
    )
    .await
    .unwrap();
    let client = pg.client(DEFAULT_DATABASE).await.unwrap();
    let row = client
        .query_one(
            "SELECT slot_name::text FROM pg_create_logical_replication_slot('t', 'pgoutput')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "t");

    pg.execute("INSERT INTO items VALUES (1, 'kettle'), (2, 'mug')")
        .await
        .unwrap();
    // pgoutput's binary messages: one Insert ('I') per row of the committed
    // transaction, bracketed by Begin ('B') and Commit ('C').
    let rows = client
        .query(
            "SELECT get_byte(data, 0) FROM pg_logical_slot_get_binary_changes(
                 't', NULL, NULL, 'proto_version', '1', 'publication_names', 'harness_pub')",
            &[],
        )
        .await
        .unwrap();
    let kinds: String = rows
        .iter()
        .map(|row| char::from(u8::try_from(row.get::<_, i32>(0)).unwrap()))
        .filter(|kind| *kind != 'R') // Relation messages precede the first insert
        .collect();
    assert_eq!(kinds, "BIIC");
}

#[tokio::test]
async fn tributary_role_can_create_a_slot_over_a_replication_connection() {
    let pg = Postgres::start().await.unwrap();
    // pg_recvlogical speaks the replication protocol (CREATE_REPLICATION_SLOT
    // on a `replication=database` connection), which needs the `host
    // replication` lines in pg_hba.conf and the REPLICATION attribute.
    let output = Command::new("/usr/lib/postgresql/15/bin/pg_recvlogical")
        .args(["-h", "127.0.0.1", "-p", &pg.port().to_string()])
        .args(["-U", USER, "-d", DEFAULT_DATABASE])
        .args([
            "--slot",
            "over_walsender",
            "--plugin",
            "pgoutput",
            "--create-slot",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "pg_recvlogical --create-slot failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let admin = pg.superuser_client("postgres").await.unwrap();
    let row = admin
        .query_one(
            "SELECT plugin::text, database::text FROM pg_replication_slots
             WHERE slot_name = 'over_walsender'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pgoutput");
    assert_eq!(row.get::<_, String>(1), DEFAULT_DATABASE);
    assert_eq!(
        pg.superuser_url("postgres"),
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/postgres", pg.port())
    );
}

#[tokio::test]
async fn kinesalite_round_trips_records_through_every_shard() {
    let kin = Kinesalite::start().await.unwrap();
    kin.create_stream("harness", 3).await.unwrap();

    let shards = kin
        .client()
        .list_shards()
        .stream_name("harness")
        .send()
        .await
        .unwrap();
    assert_eq!(shards.shards().len(), 3);

    // 60 records over 12 keys: every shard gets some, and each key gets
    // several records whose order must survive.
    let mut sent = Vec::new();
    for i in 0..60 {
        let key = format!("public.orders:{}", i % 12);
        let data = serde_json::json!({ "seq": i, "key": key });
        kin.client()
            .put_record()
            .stream_name("harness")
            .partition_key(&key)
            .data(Blob::new(serde_json::to_vec(&data).unwrap()))
            .send()
            .await
            .unwrap();
        sent.push((key, data));
    }

    let records = kin.read_all("harness").await.unwrap();
    assert_eq!(records.len(), sent.len());

    let mut shards_seen: Vec<&str> = records.iter().map(|r| r.shard_id.as_str()).collect();
    shards_seen.dedup();
    assert_eq!(
        shards_seen.len(),
        3,
        "records are not grouped by shard: {shards_seen:?}"
    );

    let mut key_shard: HashMap<&str, &str> = HashMap::new();
    let mut last_seq_per_key: HashMap<&str, i64> = HashMap::new();
    for pair in records.windows(2) {
        if pair[0].shard_id == pair[1].shard_id {
            let (a, b) = (&pair[0].sequence_number, &pair[1].sequence_number);
            assert!((a.len(), a) < (b.len(), b), "sequence numbers out of order");
        }
    }
    for record in &records {
        let data = record.json().unwrap();
        assert_eq!(data["key"].as_str(), Some(record.partition_key.as_str()));
        let key = record.partition_key.as_str();
        let shard = key_shard.entry(key).or_insert(record.shard_id.as_str());
        assert_eq!(*shard, record.shard_id, "one key landed in two shards");
        let seq = data["seq"].as_i64().unwrap();
        let previous = last_seq_per_key.insert(key, seq);
        assert!(
            previous.is_none_or(|p| p < seq),
            "key order broken at {data}"
        );
    }

    let mut read: Vec<serde_json::Value> = kin.read_all_json("harness").await.unwrap();
    let mut expected: Vec<serde_json::Value> = sent.into_iter().map(|(_, d)| d).collect();
    let by_seq = |v: &serde_json::Value| v["seq"].as_i64();
    read.sort_by_key(by_seq);
    expected.sort_by_key(by_seq);
    assert_eq!(read, expected);
}

/// The latency benchmark's endpoint answers PutRecords as kinesalite would
/// (the same shard per partition key or explicit hash key) and keeps what
/// it was sent; the stream's description still comes from kinesalite.
#[tokio::test]
async fn instant_kinesis_puts_entries_on_the_shards_kinesalite_would() {
    let kin = Kinesalite::start().await.unwrap();
    kin.create_stream("instant", 4).await.unwrap();
    kin.wait_active("instant").await.unwrap();
    let shards = tributary_kinesis::describe_stream(kin.client(), "instant")
        .await
        .unwrap()
        .shards;
    let upstream = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, kin.port()));
    let instant = InstantKinesis::start(upstream, "instant", shards)
        .await
        .unwrap();
    let client = kinesis_client(&format!("http://{}", instant.addr())).await;

    let entries: Vec<PutRecordsRequestEntry> = (0..40)
        .map(|i| {
            let entry = PutRecordsRequestEntry::builder()
                .partition_key(format!("public.orders:{i}"))
                .data(Blob::new(format!("{{\"n\":{i}}}")));
            // Every fourth entry is routed by an explicit hash key instead.
            let entry = if i % 4 == 0 {
                entry.explicit_hash_key((u128::MAX / 40 * i).to_string())
            } else {
                entry
            };
            entry.build().unwrap()
        })
        .collect();
    let call = |client: &aws_sdk_kinesis::Client| {
        client
            .put_records()
            .stream_name("instant")
            .set_records(Some(entries.clone()))
            .send()
    };
    let answered = call(&client).await.unwrap();
    let stored = call(kin.client()).await.unwrap();

    assert_eq!(answered.failed_record_count(), Some(0));
    let shard_ids = |out: &aws_sdk_kinesis::operation::put_records::PutRecordsOutput| {
        out.records()
            .iter()
            .map(|r| r.shard_id().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(shard_ids(&answered), shard_ids(&stored));
    let mut distinct = shard_ids(&answered);
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "40 keys reach every one of 4 shards");

    let received = instant.received();
    assert_eq!(received.len(), entries.len());
    for ((record, entry), shard) in received.iter().zip(&entries).zip(shard_ids(&stored)) {
        assert_eq!(record.data, entry.data().as_ref());
        assert_eq!(Some(record.partition_key.as_str()), entry.partition_key());
        assert_eq!(record.shard_id, shard);
        assert!(record.arrival_millis.is_some());
    }
    // Nothing went to kinesalite through it: the stream holds one copy.
    assert_eq!(kin.read_all("instant").await.unwrap().len(), entries.len());
    // Other calls pass through to kinesalite.
    let summary = client
        .describe_stream_summary()
        .stream_name("instant")
        .send()
        .await
        .unwrap();
    assert_eq!(
        summary
            .stream_description_summary()
            .unwrap()
            .open_shard_count(),
        4
    );
}

#[tokio::test]
async fn kinesalite_listens_on_loopback_only() {
    let kin = Kinesalite::start().await.unwrap();
    assert_eq!(kin.endpoint(), format!("http://127.0.0.1:{}", kin.port()));
    assert_loopback_only(kin.port());

    // The check itself must be able to fail: a listener on every interface
    // shows up as 0.0.0.0.
    let wildcard = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    let port = wildcard.local_addr().unwrap().port();
    let addrs = listening_addresses(port).unwrap();
    assert_eq!(addrs, vec![wildcard.local_addr().unwrap()]);
    assert!(addrs.iter().all(|addr| addr.ip().is_unspecified()));
}

#[tokio::test]
async fn stopping_the_servers_frees_their_ports() {
    let pg = Postgres::start().await.unwrap();
    let kin = Kinesalite::start().await.unwrap();
    let (pg_port, kin_port, pg_dir) = (pg.port(), kin.port(), pg.dir().to_path_buf());
    drop(pg);
    drop(kin);
    assert!(!pg_dir.exists(), "postgres' directory was left behind");
    // kinesalite is killed asynchronously; give the kernel a moment.
    for _ in 0..100 {
        if listening_addresses(pg_port).unwrap().is_empty()
            && listening_addresses(kin_port).unwrap().is_empty()
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("a server still listens after its handle was dropped");
}

#[tokio::test]
async fn postgres_restart_keeps_data_and_slots() {
    let mut pg = Postgres::start().await.unwrap();
    pg.execute("CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept VALUES (1), (2)")
        .await
        .unwrap();
    // Its own transaction: a slot cannot be created after writes in one.
    pg.execute("SELECT pg_create_logical_replication_slot('kept_slot', 'pgoutput')")
        .await
        .unwrap();
    let port = pg.port();

    pg.stop().unwrap();
    assert!(
        listening_addresses(port).unwrap().is_empty(),
        "stopped, yet listening"
    );
    assert!(pg.client(DEFAULT_DATABASE).await.is_err());

    pg.restart().unwrap();
    assert_eq!(pg.port(), port);
    let client = pg.client(DEFAULT_DATABASE).await.unwrap();
    let rows = client
        .query_one("SELECT count(*) FROM kept", &[])
        .await
        .unwrap();
    assert_eq!(rows.get::<_, i64>(0), 2);
    let slots = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'kept_slot'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(slots.get::<_, i64>(0), 1);
}

#[tokio::test]
async fn kinesalite_can_come_back_on_the_same_port() {
    let first = Kinesalite::start().await.unwrap();
    let port = first.port();
    first.create_stream("before", 1).await.unwrap();
    drop(first);
    // Dropping waits for the emulator to be gone, so the port is free at
    // once: what an outage-and-recovery test relies on.
    let second = Kinesalite::start_on(port).await.unwrap();
    second.create_stream("after", 1).await.unwrap();
    let streams = second.client().list_streams().send().await.unwrap();
    // In memory only: the restarted emulator starts empty.
    assert_eq!(streams.stream_names(), ["after"]);
}
