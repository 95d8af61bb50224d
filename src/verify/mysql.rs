//! `verify`'s reader of MySQL/MariaDB tables: each consistent read is a
//! connection in `START TRANSACTION WITH CONSISTENT SNAPSHOT` (REPEATABLE
//! READ, UTC, utf8mb4: the snapshot reader's session, without its lock),
//! every table read by primary key in chunks and each row rendered as the
//! MySQL snapshot renders it (an `op = "snapshot"` envelope through the
//! binlog's value code), so a healthy pipeline compares byte for byte.

use anyhow::Context as _;
use mysql_async::Conn;
use mysql_async::prelude::Queryable as _;
use tributary_mysql::config::MysqlSourceConfig;
use tributary_mysql::decoder::Decoder;
use tributary_mysql::snapshot;

use super::{Captured, TableSource};
use crate::replica::Change;

/// The captured tables of a MySQL source, read at consistent points.
pub struct MysqlTables {
    opts: tributary_mysql::tls::ConnectOpts,
    decoder: Decoder,
    chunk_rows: usize,
    /// The connection of the open consistent read.
    reader: Option<Conn>,
    /// The id the next table is mapped under in the decoder.
    next_id: u64,
}

impl MysqlTables {
    /// Connects; the captured tables (`db.table`) with the stream each
    /// routes to, and the reader.
    pub async fn connect(cfg: &MysqlSourceConfig) -> anyhow::Result<(Captured, Self)> {
        let decoder = Decoder::new(&cfg.name, cfg.router.clone(), cfg.filter.clone());
        let mut side = cfg
            .opts
            .connect()
            .await
            .context("connecting to the MySQL source")?;
        let tables = snapshot::base_tables(&mut side)
            .await?
            .into_iter()
            .filter(|(db, table)| decoder.captures(db, table))
            .map(|(db, table)| {
                let stream = cfg.router.resolve(&cfg.name, &db, None, &table);
                (format!("{db}.{table}"), stream)
            })
            .collect();
        side.disconnect().await.ok();
        let captured = Captured {
            tables,
            default_scope: cfg.opts.db_name().unwrap_or_default().to_owned(),
        };
        let reader = Self {
            opts: cfg.opts.clone(),
            decoder,
            chunk_rows: cfg.snapshot_chunk_rows,
            reader: None,
            next_id: 0,
        };
        Ok((captured, reader))
    }
}

impl TableSource for MysqlTables {
    async fn begin(&mut self) -> anyhow::Result<()> {
        self.reader = Some(snapshot::begin(&self.opts, None, None).await?.reader);
        Ok(())
    }

    async fn scan(&mut self, name: &str, each: &mut dyn FnMut(Change)) -> anyhow::Result<()> {
        let reader = self
            .reader
            .as_mut()
            .context("a table read outside a consistent read")?;
        let (db, table) = name.split_once('.').unwrap_or(("", name));
        let id = self.next_id;
        self.next_id += 1;
        snapshot::read_table(
            reader,
            &mut self.decoder,
            id,
            (db, table),
            self.chunk_rows,
            |record| {
                if let Some(change) = Change::parse(&record.data) {
                    each(change);
                }
            },
        )
        .await?;
        self.decoder.forget(id);
        Ok(())
    }

    async fn end(&mut self) -> anyhow::Result<()> {
        if let Some(mut reader) = self.reader.take() {
            reader
                .query_drop("COMMIT")
                .await
                .context("ending the consistent read")?;
            reader.disconnect().await.ok();
        }
        Ok(())
    }
}
