//! The streaming loop: reads `pgoutput` from the slot, decodes row changes
//! into records for the sink, and acknowledges to the server (standby status
//! update) only the positions the [`AckTracker`] says are fully done.
//!
//! A transaction is never split across an acknowledgement: the tracker only
//! ever releases commit end LSNs (or, with nothing in flight, the WAL end of
//! a keepalive). On shutdown the loop finishes the transaction it is in,
//! waits for the sink to report everything done, sends the final standby
//! status update and only then closes the stream.

use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio::sync::{mpsc, watch};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};
use tracing::{debug, info, warn};
use tributary_envelope::{AckTracker, Budget, Record};

use crate::catalog::Catalog;
use crate::config::PostgresSourceConfig;
use crate::decoder::{Decoder, Transaction};
use crate::error::PostgresError;
use crate::pgoutput::{self, Message};
use crate::setup::{self, SetupReport};

/// Session settings that give every type one text shape (see `types`).
const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c IntervalStyle=iso_8601 -c TimeZone=UTC \
     -c bytea_output=hex -c lc_monetary=C -c extra_float_digits=1";

/// Messages the replication client may read ahead of the decoder.
const REPLICATION_QUEUE_MESSAGES: usize = 64;

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Shutdown was requested; everything read was delivered and acknowledged.
    Drained,
    /// Shutdown was requested; records were still in flight when the
    /// deadline passed (they are sent again after a restart).
    TimedOut,
}

/// A connected Postgres source, ready to stream.
pub struct PostgresSource {
    cfg: PostgresSourceConfig,
    side: Client,
    catalog: Catalog,
    decoder: Decoder,
    report: SetupReport,
}

impl std::fmt::Debug for PostgresSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSource")
            .field("slot", &self.cfg.slot)
            .field("publication", &self.cfg.publication)
            .finish_non_exhaustive()
    }
}

/// Opens an ordinary (non-replication) connection.
pub async fn connect_sql(config: &tokio_postgres::Config) -> Result<Client, PostgresError> {
    let (client, connection) =
        config
            .connect(NoTls)
            .await
            .map_err(|e| PostgresError::Connection {
                context: format!("connecting to {}", describe(config)),
                source: Box::new(e),
            })?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            debug!(error = %err, "postgres connection ended");
        }
    });
    Ok(client)
}

/// `host:port/db` of a connection, without secrets.
pub fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or("?"))
}

impl PostgresSource {
    /// Connects, checks the server, and creates the publication and the slot
    /// when missing.
    pub async fn connect(cfg: PostgresSourceConfig) -> Result<Self, PostgresError> {
        let side = connect_sql(&cfg.connection).await?;
        let report = setup::ensure(&side, &cfg.filter, &cfg.publication, &cfg.slot).await?;
        let db = cfg.connection.get_dbname().unwrap_or_default().to_owned();
        let decoder = Decoder::new(&cfg.name, &db, cfg.router.clone(), cfg.filter.clone());
        Ok(Self {
            cfg,
            side,
            catalog: Catalog::default(),
            decoder,
            report,
        })
    }

    /// What start-up found: tables, created objects, the resume position.
    pub fn report(&self) -> &SetupReport {
        &self.report
    }

    fn replication_config(&self, start: u64) -> ReplicationConfig {
        let c = &self.cfg.connection;
        let host = match c.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let password = c
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        ReplicationConfig::new(
            host,
            c.get_user().unwrap_or_default(),
            password,
            c.get_dbname().unwrap_or_default(),
            self.cfg.slot.clone(),
            self.cfg.publication.clone(),
        )
        .with_port(c.get_ports().first().copied().unwrap_or(5432))
        .with_options(SESSION_OPTIONS)
        .with_application_name(format!("tributary-{}", self.cfg.name))
        .with_start_lsn(Lsn::from_u64(0))
        .with_ack_lsn(Lsn::from_u64(start))
        .with_status_interval(Duration::from_millis(100))
        .with_wakeup_interval(Duration::from_secs(5))
        // Counted in messages, ahead of the byte budget: keep it short so
        // the budget, not this queue, bounds memory (wide rows included).
        .with_buffer_size(REPLICATION_QUEUE_MESSAGES)
    }

    async fn confirmed_flush(&self) -> Result<u64, PostgresError> {
        let row = self
            .side
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.cfg.slot],
            )
            .await
            .map_err(PostgresError::query(
                "reading the slot's confirmed_flush_lsn",
            ))?
            .ok_or_else(|| {
                PostgresError::Setup(format!("replication slot {} disappeared", self.cfg.slot))
            })?;
        Ok(row
            .get::<_, Option<String>>(0)
            .and_then(|s| Lsn::parse(&s).ok())
            .map(Lsn::as_u64)
            .unwrap_or(0))
    }

    /// Streams until `shutdown` turns true, reconnecting after transient
    /// failures. Records go to `out`; their bytes are taken from `budget`
    /// before they are decoded further.
    pub async fn run(
        mut self,
        out: mpsc::Sender<Vec<Record>>,
        tracker: Arc<AckTracker>,
        budget: Arc<Budget>,
        mut shutdown: watch::Receiver<bool>,
        drain_timeout: Duration,
    ) -> Result<Stopped, PostgresError> {
        let mut state = RunState {
            out: Some(out),
            tracker,
            budget,
            next_seq: 0,
            batch: Vec::with_capacity(self.cfg.batch_records),
        };
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.session(&mut state, &mut shutdown, drain_timeout).await {
                Ok(stopped) => return Ok(stopped),
                Err(err) if err.is_transient() && !*shutdown.borrow() => {
                    warn!(error = %err, retry_in = ?backoff, "replication session failed; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    if let Ok(side) = connect_sql(&self.cfg.connection).await {
                        self.side = side;
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn session(
        &mut self,
        st: &mut RunState,
        shutdown: &mut watch::Receiver<bool>,
        drain_timeout: Duration,
    ) -> Result<Stopped, PostgresError> {
        let start = self.confirmed_flush().await?.max(st.tracker.acked());
        let conn_err = |context: &str| {
            let context = context.to_owned();
            move |e: pgwire_replication::PgWireError| PostgresError::Connection {
                context,
                source: Box::new(e),
            }
        };
        let mut client = ReplicationClient::connect(self.replication_config(start))
            .await
            .map_err(conn_err("starting replication"))?;
        client
            .wait_started()
            .await
            .map_err(conn_err("starting replication"))?;
        info!(
            server = %describe(&self.cfg.connection),
            slot = %self.cfg.slot,
            publication = %self.cfg.publication,
            from_lsn = %Lsn::from_u64(start),
            tables = self.report.tables.len(),
            "streaming changes from postgres"
        );
        let mut acked = st.tracker.subscribe();
        let mut tx: Option<Transaction> = None;
        let mut stopping = *shutdown.borrow();
        let mut decoded = Vec::with_capacity(4);
        loop {
            if stopping && tx.is_none() {
                break;
            }
            let event = tokio::select! {
                biased;
                _ = acked.changed() => {
                    client.update_applied_lsn(Lsn::from_u64(*acked.borrow_and_update()));
                    continue;
                }
                _ = shutdown.changed(), if !stopping => {
                    stopping = *shutdown.borrow();
                    continue;
                }
                event = client.recv() => event.map_err(conn_err("reading the replication stream"))?,
            };
            let Some(event) = event else {
                return Err(PostgresError::Connection {
                    context: "the server ended the replication stream".into(),
                    source: "stream closed".into(),
                });
            };
            match event {
                ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                } => {
                    tx = Some(Transaction::begin(
                        final_lsn.as_u64(),
                        xid,
                        commit_time_micros,
                    ))
                }
                ReplicationEvent::XLogData { data, .. } => {
                    let msg = pgoutput::parse(&data)?;
                    if let Message::Relation(rel) = &msg {
                        let facts = if self.decoder.captures(&rel.schema, &rel.table) {
                            self.catalog.describe(&self.side, rel).await?
                        } else {
                            Default::default()
                        };
                        self.decoder.relation(rel, facts);
                        continue;
                    }
                    let Some(tx) = tx.as_mut() else { continue };
                    let captured_at = tributary_envelope::time::now();
                    self.decoder.change(&msg, tx, &captured_at, &mut decoded)?;
                    for record in decoded.drain(..) {
                        st.push(record, &client, &mut acked).await?;
                    }
                }
                ReplicationEvent::Commit { end_lsn, .. } => {
                    st.flush().await?;
                    st.tracker.commit(st.next_seq, end_lsn.as_u64());
                    tx = None;
                }
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    if tx.is_none() && st.batch.is_empty() {
                        st.tracker.idle(wal_end.as_u64());
                    }
                }
                ReplicationEvent::Message { .. } => {}
                ReplicationEvent::StoppedAt { .. } => break,
            }
        }
        // Shutdown at a transaction boundary: hand over the rest, let the
        // sink finish, then acknowledge the last commit before closing.
        st.flush().await?;
        st.out = None;
        let deadline = tokio::time::Instant::now() + drain_timeout;
        let mut stopped = Stopped::Drained;
        while !st.tracker.is_drained() {
            tokio::select! {
                _ = acked.changed() => {
                    client.update_applied_lsn(Lsn::from_u64(*acked.borrow_and_update()));
                }
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    stopped = Stopped::TimedOut;
                    break;
                }
            }
        }
        let last = st.tracker.acked();
        client.update_applied_lsn(Lsn::from_u64(last));
        let metrics = client.metrics();
        let confirm_deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while metrics.last_applied_lsn().as_u64() < last
            && tokio::time::Instant::now() < confirm_deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        client.stop();
        while let Ok(Some(_)) = client.recv().await {}
        info!(acknowledged_lsn = %Lsn::from_u64(last), in_flight = st.tracker.in_flight(), "replication stopped");
        Ok(stopped)
    }
}

struct RunState {
    out: Option<mpsc::Sender<Vec<Record>>>,
    tracker: Arc<AckTracker>,
    budget: Arc<Budget>,
    next_seq: u64,
    batch: Vec<Record>,
}

impl RunState {
    /// Takes budget for a record (acknowledging what completes meanwhile)
    /// and adds it to the batch.
    async fn push(
        &mut self,
        mut record: Record,
        client: &ReplicationClient,
        acked: &mut watch::Receiver<u64>,
    ) -> Result<(), PostgresError> {
        let weight = record.weight();
        if self.budget.available() < weight.min(self.budget.capacity()) {
            // Hand over what we hold so it can complete and free budget.
            self.flush().await?;
        }
        {
            let acquire = self.budget.acquire(weight);
            tokio::pin!(acquire);
            loop {
                tokio::select! {
                    _ = &mut acquire => break,
                    Ok(()) = acked.changed() => {
                        client.update_applied_lsn(Lsn::from_u64(*acked.borrow_and_update()));
                    }
                }
            }
        }
        record.seq = self.next_seq;
        self.next_seq += 1;
        self.batch.push(record);
        if self.batch.len() >= self.batch.capacity() {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), PostgresError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let capacity = self.batch.capacity();
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(capacity));
        self.tracker.issued(self.next_seq);
        let out = self.out.as_ref().ok_or(PostgresError::PipelineClosed)?;
        out.send(batch)
            .await
            .map_err(|_| PostgresError::PipelineClosed)
    }
}
